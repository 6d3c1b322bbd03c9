//! A fast scripted IMAP backend for benchmarks: greets, accepts any LOGIN (literals too,
//! as nginx's mail proxy sends them), then acts by user name.
//!
//! `sink` reads and discards until end of stream; `source-N` waits for one byte from the
//! client, then sends N bytes and closes;
//! `idle` (or anyone else) waits for the client to close. Usage: backend ADDR

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:11143".to_owned());
    // One thread: the backend shares its core with the load generator, never with the proxy.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                if let Err(e) = serve(stream).await {
                    eprintln!("backend: {e}");
                }
            });
        }
    })
}

/// Reads one command, following `{n}` literals with a `+` continuation; None at EOF.
async fn command(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    let mut out = Vec::new();
    loop {
        let line = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = buf.drain(..i + 2).collect();
                break line;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
        let literal = text.strip_suffix('}').and_then(|t| t.rsplit_once('{')).and_then(|(head, n)| {
            n.trim_end_matches('+').parse::<usize>().ok().map(|n| (head.to_owned(), n))
        });
        match literal {
            Some((head, n)) => {
                stream.write_all(b"+ go ahead\r\n").await?;
                while buf.len() < n {
                    let mut chunk = [0u8; 4096];
                    let got = stream.read(&mut chunk).await?;
                    if got == 0 {
                        return Ok(None);
                    }
                    buf.extend_from_slice(&chunk[..got]);
                }
                let value: Vec<u8> = buf.drain(..n).collect();
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(&value);
            }
            None => {
                out.extend_from_slice(text.as_bytes());
                return Ok(Some(String::from_utf8_lossy(&out).into_owned()));
            }
        }
    }
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.write_all(b"* OK [CAPABILITY IMAP4rev1] bench backend ready\r\n").await?;
    let mut buf = Vec::new();
    let user = loop {
        let Some(cmd) = command(&mut stream, &mut buf).await? else { return Ok(()) };
        let mut words = cmd.split_whitespace();
        let tag = words.next().unwrap_or("*").to_owned();
        match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("LOGIN") => {
                let user = words.next().unwrap_or("").trim_matches('"').to_owned();
                stream.write_all(format!("{tag} OK LOGIN completed\r\n").as_bytes()).await?;
                break user;
            }
            Some("CAPABILITY") => {
                stream.write_all(format!("* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\n").as_bytes()).await?
            }
            Some("LOGOUT") => {
                stream.write_all(format!("* BYE\r\n{tag} OK bye\r\n").as_bytes()).await?;
                return Ok(());
            }
            _ => stream.write_all(format!("{tag} OK\r\n").as_bytes()).await?,
        }
    };
    let mut chunk = vec![0u8; CHUNK];
    if user == "sink" {
        while stream.read(&mut chunk).await? > 0 {}
    } else if let Some(n) = user.strip_prefix("source-").and_then(|n| n.parse::<usize>().ok()) {
        // Wait for the client's go-ahead: nginx reads the login reply line by line and
        // refuses data that arrives glued to it.
        if buf.is_empty() && stream.read(&mut chunk).await? == 0 {
            return Ok(());
        }
        let data = vec![0x5au8; CHUNK];
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            stream.write_all(&data[..k]).await?;
            left -= k;
        }
    } else {
        while stream.read(&mut chunk).await? > 0 {}
    }
    stream.shutdown().await
}
