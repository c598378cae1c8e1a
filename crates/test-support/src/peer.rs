//! Servers that tell a client the address they see it at, for tests of sandbox networking.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

/// Answers every HTTP/1.1 request on `listener` with 200 and the peer's address as the body,
/// keeping connections open between requests until the client asks to close, from threads that
/// live as long as the test.
pub fn serve_http(listener: TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let peer = stream.peer_addr().map(|a| a.ip().to_string());
                let peer = peer.unwrap_or_default();
                let mut writer = &stream;
                let mut reader = BufReader::new(&stream);
                loop {
                    let mut close = false;
                    let mut saw_request = false;
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" && saw_request {
                            break;
                        }
                        saw_request = true;
                        close |= line.to_ascii_lowercase().starts_with("connection: close");
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{peer}",
                        peer.len()
                    );
                    if writer.write_all(answer.as_bytes()).is_err() || close {
                        return;
                    }
                }
            });
        }
    });
}
