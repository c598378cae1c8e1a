//! A DNS server for tests of sandbox egress: fixed A records for a few names, NXDOMAIN for
//! every other, on UDP and TCP port 53 of an address inside a network namespace.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record};

/// Serves `names` (each answered with its address, TTL 1 s) on `addr`:53 inside the network
/// namespace `netns` (a name under `/run/netns`), from threads that live as long as the test.
pub fn serve(netns: &str, addr: Ipv4Addr, names: &'static [(&'static str, [u8; 4])]) {
    let path = format!("/run/netns/{netns}");
    let (udp, tcp) = std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        (
            UdpSocket::bind((addr, 53)).expect("binding udp 53"),
            TcpListener::bind((addr, 53)).expect("binding tcp 53"),
        )
    })
    .join()
    .expect("the binding thread");
    std::thread::spawn(move || {
        let mut buffer = [0; 1500];
        while let Ok((n, peer)) = udp.recv_from(&mut buffer) {
            if let Some(reply) = answer(names, &buffer[..n]) {
                let _ = udp.send_to(&reply, peer);
            }
        }
    });
    std::thread::spawn(move || {
        for mut stream in tcp.incoming().flatten() {
            let mut len = [0; 2];
            if stream.read_exact(&mut len).is_err() {
                continue;
            }
            let mut query = vec![0; usize::from(u16::from_be_bytes(len))];
            if stream.read_exact(&mut query).is_err() {
                continue;
            }
            if let Some(reply) = answer(names, &query) {
                let len = u16::try_from(reply.len()).expect("a small reply");
                let _ = stream.write_all(&len.to_be_bytes());
                let _ = stream.write_all(&reply);
            }
        }
    });
}

fn answer(names: &[(&str, [u8; 4])], query: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries().first()?;
    let mut reply = Message::new();
    reply.set_id(query.id());
    reply.set_message_type(MessageType::Response);
    reply.add_queries(query.queries().to_vec());
    let asked = question.name().to_ascii();
    match names
        .iter()
        .find(|(name, _)| asked.trim_end_matches('.') == *name)
    {
        Some((_, ip)) => {
            let rdata = RData::A(A(Ipv4Addr::from(*ip)));
            reply.add_answer(Record::from_rdata(question.name().clone(), 1, rdata));
        }
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
    }
    reply.to_vec().ok()
}
