//! The userfaultfd page server (`wrenn uffd-serve`) as a restored Firecracker guest meets it:
//! a real process serving real userfaultfd faults, with this test in Firecracker's place (the
//! guest memory mapped and registered, the handshake sent). Every page reads as the snapshot's
//! memory file has it (holes as zeros), writes stay, given-back pages read as zero, the pages
//! touched are recorded, and the next restore gets them prefetched.

#[path = "support/uffd.rs"]
mod uffd;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uffd::{LazyMemory, PAGE};
use wrenn::vmm::firecracker::uffd::read_pages;

const PAGES: usize = 64;

fn wrenn_binary() -> &'static str {
    env!("CARGO_BIN_EXE_wrenn")
}

fn page_server(socket: &Path, memory: &Path, prefetch: Option<&Path>, record: &Path) -> Child {
    let mut command = Command::new(wrenn_binary());
    command
        .arg("uffd-serve")
        .arg("--socket")
        .arg(socket)
        .arg("--memory")
        .arg(memory)
        .arg("--record")
        .arg(record)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(prefetch) = prefetch {
        command.arg("--prefetch").arg(prefetch);
    }
    let mut child = command.spawn().unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready, "ready\n");
    child
}

/// Waits for the page server to end (its guest gone) and answers its summary line.
fn finish(mut child: Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(status.success(), "uffd-serve failed: {err}");
            return err;
        }
        assert!(
            Instant::now() < deadline,
            "the page server outlived its guest"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn summary_field(summary: &str, name: &str) -> u64 {
    let field = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {summary}"));
    field.parse().unwrap()
}

/// A memory file of `PAGES` pages: page `i` filled with byte `i + 1`, except every fourth page,
/// a hole; the last page cut short (a file need not be page-sized).
fn memory_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("memory");
    let file = std::fs::File::create(&path).unwrap();
    for i in 0..PAGES {
        if i % 4 == 3 {
            continue;
        }
        let len = if i == PAGES - 1 { PAGE / 2 } else { PAGE };
        std::os::unix::fs::FileExt::write_at(&file, &vec![i as u8 + 1; len], (i * PAGE) as u64)
            .unwrap();
    }
    path
}

fn expected(i: usize, at: usize) -> u8 {
    if i % 4 == 3 || (i == PAGES - 1 && at >= PAGE / 2) {
        0
    } else {
        i as u8 + 1
    }
}

#[test]
fn a_lazily_restored_guest_sees_its_snapshot_keeps_its_writes_and_gets_its_working_set_first() {
    let dir = tempfile::tempdir().unwrap();
    let memory = memory_file(dir.path());
    let socket = dir.path().join("uffd.sock");
    let record = dir.path().join("touched");

    let server = page_server(&socket, &memory, None, &record);
    let mut guest = LazyMemory::connect(&socket, PAGES * PAGE);
    let bytes = guest.bytes();
    // The guest touches the first half: each page as the file has it.
    for i in 0..PAGES / 2 {
        for at in [0, PAGE / 2, PAGE - 1] {
            assert_eq!(bytes[i * PAGE + at], expected(i, at), "page {i} byte {at}");
        }
    }
    // Its writes stay, in pages it had read and in pages it had not.
    bytes[5 * PAGE + 7] = 0xAB;
    bytes[40 * PAGE] = 0xCD;
    assert_eq!(bytes[5 * PAGE + 7], 0xAB);
    assert_eq!(bytes[40 * PAGE], 0xCD);
    assert_eq!(bytes[40 * PAGE + 1], expected(40, 1));
    // The last page, short in the file, reads zero past the file's end.
    assert_eq!(bytes[(PAGES - 1) * PAGE], expected(PAGES - 1, 0));
    assert_eq!(bytes[PAGES * PAGE - 1], 0);
    // Pages given back (a balloon) read as zero, not as the file.
    guest.give_back(8 * PAGE, 2 * PAGE);
    let bytes = guest.bytes();
    assert_eq!(bytes[8 * PAGE], 0);
    assert_eq!(bytes[9 * PAGE + 100], 0);
    assert_eq!(bytes[10 * PAGE], expected(10, 0));
    drop(guest);
    let summary = finish(server);
    assert!(summary_field(&summary, "faults") >= 34, "{summary}");
    assert_eq!(summary_field(&summary, "prefetched"), 0, "{summary}");

    // The record lists the pages it touched: its working set.
    let touched = read_pages(&record);
    for page in [0u64, 5, 31, 40, PAGES as u64 - 1] {
        assert!(touched.contains(&page), "{page} in {touched:?}");
    }
    assert!(!touched.contains(&50), "{touched:?}");

    // The next restore gets that working set before it asks: its faults are fewer.
    let next_record = dir.path().join("touched-next");
    let server = page_server(&socket, &memory, Some(&record), &next_record);
    let mut guest = LazyMemory::connect(&socket, PAGES * PAGE);
    // Give the prefetch a moment to run ahead, as the guest's boot-up would.
    std::thread::sleep(Duration::from_millis(300));
    let bytes = guest.bytes();
    for i in 0..PAGES / 2 {
        assert_eq!(bytes[i * PAGE + 1], expected(i, 1), "page {i}");
    }
    drop(guest);
    let summary = finish(server);
    assert_eq!(
        summary_field(&summary, "prefetched"),
        touched.len() as u64,
        "{summary}"
    );
    assert!(
        summary_field(&summary, "faults") < PAGES as u64 / 4,
        "the prefetched pages did not fault: {summary}"
    );
}

#[test]
fn a_page_server_nobody_connects_to_gives_up_and_a_bad_handshake_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let memory = memory_file(dir.path());
    let socket = dir.path().join("uffd.sock");
    let server = page_server(&socket, &memory, None, &dir.path().join("touched"));
    // Not JSON, and no descriptor: refused, not served.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::io::Write::write_all(&mut stream, b"hello").unwrap();
    let output = server.wait_with_output().unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("handshake"), "{err}");
    assert!(!socket.exists(), "the socket is removed");
}
