//! Choosing QEMU's accelerator. `/dev/kvm` existing and opening is not proof that KVM can run a
//! guest: under some nested hypervisors a stock Linux guest crawls and then stops on an
//! instruction KVM cannot emulate ("KVM internal error ... emulation failure"), with QEMU left
//! alive and the guest paused. So `auto` boots the configured kernel once under KVM with no
//! root filesystem and `panic=-1`: a working KVM reaches the "no root" panic and QEMU exits
//! within a second or two; anything else within the deadline means TCG.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::config::QemuAccel;

/// A working KVM boots the kernel to its panic in well under a second; TCG needs 2–6 s on a
/// loaded two-core machine. Past this, the guest is not running at hardware speed.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// What QEMU prints when KVM stops the guest on an instruction it cannot handle.
const KVM_FAILURE_MARKER: &str = "KVM internal error";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    /// The accelerator a QEMU command line from [`super::command_line`] runs under.
    pub fn of_command_line(args: &[String]) -> Option<Self> {
        let value = args
            .windows(2)
            .find_map(|pair| (pair[0] == "-accel").then_some(pair[1].as_str()))?;
        [Self::Kvm, Self::Tcg]
            .into_iter()
            .find(|accel| accel.as_str() == value)
    }
}

/// The accelerator in use and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Resolves `configured` into an accelerator, probing KVM for `auto`.
/// Every decision is logged: a guest under TCG runs tens of times slower, so it is never a
/// silent one (production configures `kvm`, which never falls back).
pub async fn decide(configured: QemuAccel, qemu_bin: &Path, kernel: &Path) -> AccelDecision {
    match configured {
        QemuAccel::Kvm => {
            tracing::info!("QEMU uses KVM (configured; no fallback to TCG)");
            AccelDecision {
                accel: Accel::Kvm,
                reason: "configured".into(),
            }
        }
        QemuAccel::Tcg => {
            tracing::warn!(
                "QEMU uses TCG (software emulation), as configured; guests run much slower"
            );
            AccelDecision {
                accel: Accel::Tcg,
                reason: "configured".into(),
            }
        }
        QemuAccel::Auto => {
            let decision = match probe_kvm(qemu_bin, kernel).await {
                Ok(elapsed) => AccelDecision {
                    accel: Accel::Kvm,
                    reason: format!(
                        "a probe guest booted under KVM in {} ms",
                        elapsed.as_millis()
                    ),
                },
                Err(why) => AccelDecision {
                    accel: Accel::Tcg,
                    reason: format!("KVM cannot run a guest here: {why}"),
                },
            };
            match decision.accel {
                Accel::Kvm => tracing::info!(reason = %decision.reason, "QEMU uses KVM"),
                Accel::Tcg => tracing::warn!(
                    reason = %decision.reason,
                    "QEMU falls back to TCG (software emulation); guests run much slower"
                ),
            }
            decision
        }
    }
}

/// Boots `kernel` under KVM and returns how long it took to panic, or why it did not.
async fn probe_kvm(qemu_bin: &Path, kernel: &Path) -> Result<Duration, String> {
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Err(format!("/dev/kvm cannot be opened ({e})"));
    }
    let started = Instant::now();
    let mut child = Command::new(qemu_bin)
        .args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ])
        .args([
            "-m",
            "128",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .args([
            "-serial",
            "stdio",
            "-append",
            "console=ttyS0 panic=-1",
            "-kernel",
        ])
        .arg(kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{} could not be started: {e}", qemu_bin.display()))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let console = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let mut stderr_text = String::new();
    let deadline = tokio::time::sleep(PROBE_DEADLINE);
    tokio::pin!(deadline);
    let outcome = loop {
        tokio::select! {
            status = child.wait() => break Ok(status),
            line = stderr.next_line() => match line {
                Ok(Some(line)) => {
                    if line.contains(KVM_FAILURE_MARKER) {
                        break Err(format!("the probe guest stopped with \"{}\"", line.trim()));
                    }
                    stderr_text.push_str(&line);
                    stderr_text.push('\n');
                }
                // stderr closed: keep waiting for the exit or the deadline.
                Ok(None) | Err(_) => {
                    let status = tokio::select! {
                        status = child.wait() => Ok(status),
                        () = &mut deadline => Err(()),
                    };
                    match status {
                        Ok(status) => break Ok(status),
                        Err(()) => break Err(format!("the probe guest did not finish booting within {PROBE_DEADLINE:?}")),
                    }
                }
            },
            () = &mut deadline => break Err(format!("the probe guest did not finish booting within {PROBE_DEADLINE:?}")),
        }
    };
    let _ = child.kill().await;
    let console = console.await.unwrap_or_default();
    match outcome {
        Err(why) => Err(why),
        Ok(Err(e)) => Err(format!("waiting for the probe failed: {e}")),
        Ok(Ok(status)) if status.success() && console.contains("Kernel panic") => {
            Ok(started.elapsed())
        }
        Ok(Ok(status)) => Err(format!(
            "the probe exited {status} without reaching the kernel's panic: {}",
            stderr_text.trim().lines().last().unwrap_or("(no output)")
        )),
    }
}
