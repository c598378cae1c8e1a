//! The guest binary: the same `wrenn`, built static so it runs in any root filesystem.

use std::process::Command;

/// Program-header types of an ELF64 little-endian file.
fn program_header_types(elf: &[u8]) -> Vec<u32> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().unwrap())
        })
        .collect()
}

const PT_INTERP: u32 = 3;

#[test]
fn static_binary_has_no_interpreter_and_runs() {
    let bin = wrenn_test_support::guest::static_binary();
    let elf = std::fs::read(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    assert!(
        !program_header_types(&elf).contains(&PT_INTERP),
        "{} needs a dynamic loader",
        bin.display()
    );
    // Run it with an empty environment, as a guest's init would.
    let output = Command::new(&bin)
        .arg("version")
        .env_clear()
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.starts_with(&format!("wrenn {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains("static"), "{text}");
}

#[test]
fn dynamic_test_build_is_detected_as_dynamic() {
    // Guards the checker itself: the ordinary test build does use a loader.
    let elf = std::fs::read(env!("CARGO_BIN_EXE_wrenn")).unwrap();
    assert!(program_header_types(&elf).contains(&PT_INTERP));
}
