//! A scripted mail backend that records every byte it receives (the PROXY header apart),
//! so a test can assert what reached it and, above all, what never did.
//!
//! Scripts answer like a small Postfix / Dovecot. A login as user "echo" (or, on SMTP,
//! `MAIL FROM:<echo@test>`) switches the connection to echo mode: every byte is sent back,
//! which lets tests check bulk integrity both ways.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    Smtp,
    /// SMTP whose EHLO offers no AUTH, XCLIENT or XFORWARD, as an MX smtpd should: the
    /// opportunistic plaintext path may then relay opaquely.
    SmtpNoAuth,
    Imap,
    Pop3,
    /// POP3 as Dovecot answers a peer in its login_trusted_networks (every client, seen
    /// through mailtls): `[XCLIENT]` in the greeting, XCLIENT in CAPA, `+OK Updated` to it.
    Pop3Trusting,
    /// IMAP whose capabilities announce XCLIENT (no real server's, a worst case).
    ImapTrusting,
    /// Accepts and never says anything.
    Silent,
    /// Greets negatively (SMTP 554 / IMAP BYE / POP3 -ERR) and closes.
    Refuse,
}

/// One connection as the backend saw it.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The PROXY header, exactly as received (empty when none came).
    pub header: Vec<u8>,
    /// Everything after the header.
    pub data: Vec<u8>,
}

impl Seen {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// A backend behind a listener that sends a PROXY header (v1 or v2).
    pub async fn start(script: Script) -> Backend {
        Backend::spawn(script, true).await
    }

    /// A backend behind a listener with `proxy_protocol = "none"`.
    pub async fn start_without_header(script: Script) -> Backend {
        Backend::spawn(script, false).await
    }

    /// A backend (with PROXY header) on a given address, e.g. one that was unreachable.
    pub async fn start_at(script: Script, addr: SocketAddr) -> Backend {
        Backend::spawn_on(TcpListener::bind(addr).await.unwrap(), script, true)
    }

    async fn spawn(script: Script, header: bool) -> Backend {
        Backend::spawn_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), script, header)
    }

    fn spawn_on(listener: TcpListener, script: Script, header: bool) -> Backend {
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>> = Arc::default();
        let all = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = Arc::new(Mutex::new(Seen::default()));
                all.lock().unwrap().push(record.clone());
                tokio::spawn(serve(stream, script, header, record));
            }
        });
        Backend { addr, seen, task }
    }

    /// An address where nothing listens (bound, then closed).
    pub async fn unreachable() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// What connection `i` has received so far.
    pub fn seen(&self, i: usize) -> Seen {
        self.seen.lock().unwrap()[i].lock().unwrap().clone()
    }

    /// All data received on all connections, concatenated.
    pub fn all_text(&self) -> String {
        let all = self.seen.lock().unwrap();
        all.iter().map(|s| s.lock().unwrap().text()).collect::<Vec<_>>().join("")
    }
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    record: Arc<Mutex<Seen>>,
}

impl Conn {
    async fn fill(&mut self) -> bool {
        self.buf.reserve(8192);
        let before = self.buf.len();
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => false,
            Ok(_) => {
                let new = self.buf[before..].to_vec();
                self.record.lock().unwrap().data.extend_from_slice(&new);
                true
            }
        }
    }

    /// Reads and strips the PROXY v1 or v2 header that must come first.
    async fn take_header(&mut self) -> bool {
        while self.buf.len() < 16 {
            if !self.fill().await {
                return false;
            }
        }
        let len = if self.buf.starts_with(V2_SIGNATURE) {
            16 + u16::from_be_bytes([self.buf[14], self.buf[15]]) as usize
        } else if self.buf.starts_with(b"PROXY ") {
            loop {
                if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                    break lf + 1;
                }
                if !self.fill().await {
                    return false;
                }
            }
        } else {
            panic!("backend expected a PROXY header, got {:?}", String::from_utf8_lossy(&self.buf));
        };
        while self.buf.len() < len {
            if !self.fill().await {
                return false;
            }
        }
        let header = self.buf.split_to(len).to_vec();
        let mut rec = self.record.lock().unwrap();
        let taken = len.min(rec.data.len());
        rec.data.drain(..taken);
        rec.header = header;
        true
    }

    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(lf + 1);
                return Some(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Skips `n` literal bytes.
    async fn skip(&mut self, mut n: usize) -> bool {
        while n > 0 {
            if self.buf.is_empty() && !self.fill().await {
                return false;
            }
            let k = n.min(self.buf.len());
            self.buf.advance(k);
            n -= k;
        }
        true
    }

    async fn say(&mut self, text: &str) -> bool {
        self.stream.write_all(text.as_bytes()).await.is_ok()
    }

    async fn echo(&mut self) {
        let pending = self.buf.split().to_vec();
        if self.stream.write_all(&pending).await.is_err() {
            return;
        }
        loop {
            if !self.fill().await {
                let _ = self.stream.shutdown().await;
                return;
            }
            let chunk = self.buf.split().to_vec();
            if self.stream.write_all(&chunk).await.is_err() {
                return;
            }
        }
    }
}

async fn serve(stream: TcpStream, script: Script, header: bool, record: Arc<Mutex<Seen>>) {
    let mut c = Conn { stream, buf: BytesMut::new(), record };
    if header && !c.take_header().await {
        return;
    }
    match script {
        Script::Smtp => smtp(c, SMTP_EHLO).await,
        Script::SmtpNoAuth => smtp(c, SMTP_EHLO_NO_AUTH).await,
        Script::Imap => imap(c, false).await,
        Script::Pop3 => pop3(c, false).await,
        Script::ImapTrusting => imap(c, true).await,
        Script::Pop3Trusting => pop3(c, true).await,
        Script::Silent => while c.fill().await {},
        Script::Refuse => {
            let _ = c.say("554 5.3.2 go away\r\n* BYE go away\r\n-ERR go away\r\n").await;
        }
    }
}

fn verb(line: &str) -> String {
    line.split(' ').next().unwrap_or("").to_ascii_uppercase()
}

pub const SMTP_EHLO: &str = "250-backend.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";

pub const SMTP_EHLO_NO_AUTH: &str =
    "250-backend.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";

async fn smtp(mut c: Conn, ehlo: &str) {
    if !c.say("220 backend.test ESMTP Postfix\r\n").await {
        return;
    }
    while let Some(line) = c.line().await {
        let reply = match verb(&line).as_str() {
            "EHLO" => ehlo.to_owned(),
            "HELO" => "250 backend.test\r\n".to_owned(),
            "AUTH" => {
                if line.split(' ').count() < 3 {
                    c.say("334 \r\n").await;
                    match c.line().await {
                        Some(l) if l == "*" => "501 5.7.0 cancelled\r\n".to_owned(),
                        Some(_) => "235 2.7.0 Authentication successful\r\n".to_owned(),
                        None => return,
                    }
                } else {
                    "235 2.7.0 Authentication successful\r\n".to_owned()
                }
            }
            "MAIL" if line.to_ascii_lowercase().contains("<echo@test>") => {
                c.say("250 2.1.0 Ok\r\n").await;
                return c.echo().await;
            }
            // A mailbox server refuses users it does not have.
            "RCPT" if line.to_ascii_lowercase().contains("<unknown@") => {
                "550 5.1.1 <unknown>: Recipient address rejected: User unknown\r\n".to_owned()
            }
            "MAIL" | "RCPT" | "NOOP" | "RSET" => "250 2.0.0 Ok\r\n".to_owned(),
            "DATA" => {
                c.say("354 End data with <CR><LF>.<CR><LF>\r\n").await;
                loop {
                    match c.line().await {
                        Some(l) if l == "." => break,
                        Some(_) => {}
                        None => return,
                    }
                }
                "250 2.0.0 Ok: queued as TEST\r\n".to_owned()
            }
            "QUIT" => {
                c.say("221 2.0.0 Bye\r\n").await;
                return;
            }
            _ => "502 5.5.2 Error: command not recognized\r\n".to_owned(),
        };
        if !c.say(&reply).await {
            return;
        }
    }
}

pub const IMAP_GREETING: &str =
    "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE STARTTLS AUTH=PLAIN] Dovecot ready.\r\n";

async fn imap(mut c: Conn, trusting: bool) {
    let greeting =
        if trusting { IMAP_GREETING.replace(" ID ", " ID XCLIENT ") } else { IMAP_GREETING.to_owned() };
    if !c.say(&greeting).await {
        return;
    }
    while let Some(mut line) = c.line().await {
        // Gather literals: `{n}` gets a continuation, `{n+}` does not.
        while let Some(open) = line.rfind('{').filter(|_| line.ends_with('}')) {
            let spec = &line[open + 1..line.len() - 1];
            let (n, sync) = match spec.strip_suffix('+') {
                Some(n) => (n.parse::<usize>().unwrap_or(0), false),
                None => (spec.parse::<usize>().unwrap_or(0), true),
            };
            if sync {
                c.say("+ OK\r\n").await;
            }
            if !c.skip(n).await {
                return;
            }
            line = format!("{} \"lit\"{}", &line[..open], c.line().await.unwrap_or_default());
        }
        let mut words = line.split(' ');
        let tag = words.next().unwrap_or("*").to_owned();
        let cmd = words.next().unwrap_or("").to_ascii_uppercase();
        let args: Vec<&str> = words.collect();
        match cmd.as_str() {
            "CAPABILITY" => {
                let xclient = if trusting { " XCLIENT" } else { "" };
                c.say(&format!(
                    "* CAPABILITY IMAP4rev1 SASL-IR STARTTLS AUTH=PLAIN LOGINDISABLED IDLE{xclient}\r\n{tag} OK Pre-login capabilities listed\r\n"
                ))
                .await;
            }
            "LOGIN" => {
                let user = args.first().copied().unwrap_or("").trim_matches('"').to_owned();
                c.say(&format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE STARTTLS] Logged in\r\n")).await;
                if user == "echo" {
                    return c.echo().await;
                }
            }
            "AUTHENTICATE" => {
                if args.len() < 2 {
                    c.say("+ \r\n").await;
                    if c.line().await.is_none() {
                        return;
                    }
                }
                c.say(&format!("{tag} OK Logged in\r\n")).await;
            }
            "NOOP" => {
                c.say(&format!("{tag} OK NOOP completed\r\n")).await;
            }
            "ID" => {
                c.say(&format!("* ID (\"name\" \"Dovecot\")\r\n{tag} OK ID completed\r\n")).await;
            }
            "LOGOUT" => {
                c.say(&format!("* BYE Logging out\r\n{tag} OK Logout completed\r\n")).await;
                return;
            }
            _ => {
                c.say(&format!("{tag} BAD Error in IMAP command\r\n")).await;
            }
        }
    }
}

async fn pop3(mut c: Conn, trusting: bool) {
    let code = if trusting { "[XCLIENT] " } else { "" };
    if !c.say(&format!("+OK {code}Dovecot ready. <1.2.3@backend.test>\r\n")).await {
        return;
    }
    let mut user = String::new();
    while let Some(line) = c.line().await {
        let reply = match verb(&line).as_str() {
            "CAPA" if trusting => "+OK\r\nCAPA\r\nTOP\r\nXCLIENT\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n".to_owned(),
            "CAPA" => "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n".to_owned(),
            "XCLIENT" | "XOIP" if trusting => "+OK Updated\r\n".to_owned(),
            "USER" => {
                user = line.split(' ').nth(1).unwrap_or("").to_owned();
                "+OK\r\n".to_owned()
            }
            "PASS" => {
                c.say("+OK Logged in.\r\n").await;
                if user == "echo" {
                    return c.echo().await;
                }
                continue;
            }
            "AUTH" => {
                if line.split(' ').count() < 3 {
                    c.say("+ \r\n").await;
                    if c.line().await.is_none() {
                        return;
                    }
                }
                "+OK Logged in.\r\n".to_owned()
            }
            "STAT" => "+OK 0 0\r\n".to_owned(),
            "QUIT" => {
                c.say("+OK Logging out.\r\n").await;
                return;
            }
            _ => "-ERR Unknown command.\r\n".to_owned(),
        };
        if !c.say(&reply).await {
            return;
        }
    }
}
