//! A fast scripted IMAP backend for benchmarks: greets, accepts any LOGIN (literals too,
//! as nginx's mail proxy sends them), then acts by user name.
//!
//! `sink` reads and discards until end of stream; `source-N` waits for one byte from the
//! client, then sends N bytes and closes; `control` (the load generator, connected
//! directly, not through the proxy) sends `push N` lines, each pushing an untagged
//! `* T EXISTS` to N logged-in sessions chosen at random, T being CLOCK_MONOTONIC in
//! microseconds modulo 10^9 when the line is written (the load generator, on the same
//! machine, reads the same clock to time the push); anyone else (`idle`, `mail`) is an
//! idle IMAP session: NOOP gets its tagged OK, pushes arrive as above, until the client
//! closes. Usage: backend ADDR

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[path = "common/stamp.rs"]
mod stamp;
use stamp::stamp_us;

const CHUNK: usize = 256 * 1024;

/// The logged-in idle sessions a push may go to: one slot each, reused after it closes.
#[derive(Default)]
struct Registry {
    slots: Vec<Option<mpsc::UnboundedSender<()>>>,
    free: Vec<usize>,
    open: usize,
    rng: u64,
}

impl Registry {
    fn add(&mut self, tx: mpsc::UnboundedSender<()>) -> usize {
        self.open += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(tx);
                i
            }
            None => {
                self.slots.push(Some(tx));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) {
        if self.slots[i].take().is_some() {
            self.open -= 1;
            self.free.push(i);
        }
    }

    /// Wakes one open session at random; false when none is open.
    fn push_one(&mut self) -> bool {
        if self.open == 0 {
            return false;
        }
        // Open slots are at least open/len of them: 1,000 draws miss all only by bad luck.
        for _ in 0..1000 {
            // xorshift64: enough spread for choosing sessions, no dependency for it.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let i = (self.rng % self.slots.len() as u64) as usize;
            if let Some(tx) = &self.slots[i] {
                if tx.send(()).is_ok() {
                    return true;
                }
            }
        }
        false
    }
}

type Shared = Arc<Mutex<Registry>>;

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:11143".to_owned());
    // One thread: the backend shares its core with the load generator, never with the proxy.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let registry: Shared =
        Arc::new(Mutex::new(Registry { rng: 0x9e37_79b9_7f4a_7c15, ..Registry::default() }));
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let registry = registry.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(stream, registry).await {
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

async fn serve(mut stream: TcpStream, registry: Shared) -> std::io::Result<()> {
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
    if user == "sink" {
        let mut chunk = vec![0u8; CHUNK];
        while stream.read(&mut chunk).await? > 0 {}
    } else if user == "control" {
        control(stream, buf, registry).await?;
        return Ok(());
    } else if let Some(n) = user.strip_prefix("source-").and_then(|n| n.parse::<usize>().ok()) {
        // Wait for the client's go-ahead: nginx reads the login reply line by line and
        // refuses data that arrives glued to it. The whole line is read: a close with unread
        // bytes in the receive buffer is a reset, which loses the tail of what was sent.
        let mut chunk = [0u8; 512];
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
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = lock(&registry).add(tx);
        let result = idle(&mut stream, buf, rx).await;
        lock(&registry).remove(slot);
        result?;
    }
    stream.shutdown().await
}

fn lock(registry: &Shared) -> std::sync::MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A logged-in idle session: answers NOOP (anything else gets a bare OK) and writes an
/// `EXISTS` for each push, until the client closes.
async fn idle(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    mut pushes: mpsc::UnboundedReceiver<()>,
) -> std::io::Result<()> {
    let mut chunk = [0u8; 512];
    loop {
        while let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = buf.drain(..i + 2).collect();
            let text = String::from_utf8_lossy(&line);
            let mut words = text.split_whitespace();
            let tag = words.next().unwrap_or("*");
            let reply = match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("NOOP") => format!("{tag} OK NOOP completed\r\n"),
                Some("LOGOUT") => {
                    stream.write_all(format!("* BYE\r\n{tag} OK bye\r\n").as_bytes()).await?;
                    return Ok(());
                }
                _ => format!("{tag} OK\r\n"),
            };
            stream.write_all(reply.as_bytes()).await?;
        }
        tokio::select! {
            n = stream.read(&mut chunk) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Some(()) = pushes.recv() => {
                stream.write_all(format!("* {} EXISTS\r\n", stamp_us()).as_bytes()).await?;
            }
        }
    }
}

/// The load generator's control session: `push N` wakes N idle sessions at random and
/// answers `pushed K` (K < N when fewer sessions are open).
async fn control(mut stream: TcpStream, mut buf: Vec<u8>, registry: Shared) -> std::io::Result<()> {
    while let Some(cmd) = command(&mut stream, &mut buf).await? {
        let n: usize = cmd.strip_prefix("push ").and_then(|n| n.trim().parse().ok()).unwrap_or(0);
        let pushed = {
            let mut r = lock(&registry);
            (0..n).take_while(|_| r.push_one()).count()
        };
        stream.write_all(format!("pushed {pushed}\r\n").as_bytes()).await?;
    }
    Ok(())
}
