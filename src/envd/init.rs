//! PID-1 duties inside a guest: the early mounts, hostname, loopback and `eth0` from the kernel's
//! `ip=` argument, resolv.conf, and the final unmount and power-off. Each step that fails is
//! logged and skipped: a guest with a half-configured system is still more useful than a kernel
//! panic from a dead init.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

pub const DEFAULT_HOSTNAME: &str = "capsule";
pub const DEFAULT_DNS: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

/// What envd takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelArgs {
    pub ip: Option<IpConfig>,
    /// `wrenn.dns=1.1.1.1,8.8.4.4`; default 8.8.8.8.
    pub dns: Vec<Ipv4Addr>,
}

/// `ip=<client>::<gateway>:<netmask>:<hostname>:<device>:off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub client: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub netmask: Ipv4Addr,
    pub hostname: Option<String>,
    pub device: String,
}

impl KernelArgs {
    pub fn parse(cmdline: &str) -> Self {
        let mut ip = None;
        let mut dns = Vec::new();
        for arg in cmdline.split_whitespace() {
            if let Some(value) = arg.strip_prefix("ip=") {
                ip = IpConfig::parse(value);
            } else if let Some(value) = arg.strip_prefix("wrenn.dns=") {
                dns = value.split(',').filter_map(|a| a.parse().ok()).collect();
            }
        }
        if dns.is_empty() {
            dns.push(DEFAULT_DNS);
        }
        Self { ip, dns }
    }

    pub fn hostname(&self) -> &str {
        self.ip
            .as_ref()
            .and_then(|ip| ip.hostname.as_deref())
            .unwrap_or(DEFAULT_HOSTNAME)
    }
}

impl IpConfig {
    fn parse(value: &str) -> Option<Self> {
        let fields: Vec<&str> = value.split(':').collect();
        let non_empty = |i: usize| fields.get(i).copied().filter(|f| !f.is_empty());
        Some(Self {
            client: non_empty(0)?.parse().ok()?,
            gateway: non_empty(2).and_then(|g| g.parse().ok()),
            netmask: non_empty(3)
                .and_then(|m| m.parse().ok())
                .unwrap_or(Ipv4Addr::new(255, 255, 255, 0)),
            hostname: non_empty(4).map(str::to_owned),
            device: non_empty(5).unwrap_or("eth0").to_owned(),
        })
    }
}

/// The file systems a guest init mounts, in order.
const MOUNTS: &[(&str, &str, &str, &str)] = &[
    ("proc", "/proc", "proc", ""),
    ("sysfs", "/sys", "sysfs", ""),
    ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
    ("devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
    ("tmpfs", "/run", "tmpfs", "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
];

/// What boot set up, so shutdown can undo it.
#[derive(Debug, Default)]
pub struct InitSystem {
    mounted: Vec<PathBuf>,
}

impl InitSystem {
    pub fn boot(args: &KernelArgs) -> Self {
        let mut system = Self::default();
        system.mount_all();
        if let Err(e) = nix::unistd::sethostname(args.hostname()) {
            tracing::warn!(error = %e, "could not set the hostname");
        }
        write_hosts(args.hostname());
        if let Err(e) = configure_network(args.ip.as_ref()) {
            tracing::warn!(error = %e, "network configuration failed");
        }
        write_resolv_conf(&args.dns);
        system
    }

    fn mount_all(&mut self) {
        for (source, target, fstype, data) in MOUNTS {
            let target = Path::new(target);
            if is_mountpoint(target) {
                continue;
            }
            let _ = std::fs::create_dir_all(target);
            let flags = match *fstype {
                "proc" | "sysfs" => MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                "devpts" => MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                "tmpfs" => MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                _ => MsFlags::MS_NOSUID,
            };
            let data = (!data.is_empty()).then_some(*data);
            match mount(Some(*source), target, Some(*fstype), flags, data) {
                Ok(()) => self.mounted.push(target.to_owned()),
                Err(e) => tracing::warn!(target = %target.display(), error = %e, "mount failed"),
            }
        }
    }

    /// Detaches what boot mounted, innermost last-mounted first.
    pub fn unmount_all(&self) {
        for target in self.mounted.iter().rev() {
            if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
                tracing::warn!(target = %target.display(), error = %e, "unmount failed");
            }
        }
    }
}

fn is_mountpoint(path: &Path) -> bool {
    if path == Path::new("/proc") {
        return Path::new("/proc/self/mountinfo").exists();
    }
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .filter_map(|line| line.split(' ').nth(4))
            .any(|mountpoint| Path::new(mountpoint) == path)
    })
}

pub(super) fn write_hosts(hostname: &str) {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let known = hosts
        .lines()
        .any(|l| l.split_whitespace().skip(1).any(|name| name == hostname));
    if known {
        return;
    }
    // A renamed guest (a clone given its own name) keeps one line for its own name.
    let mut text: String = hosts
        .lines()
        .filter(|l| !l.starts_with("127.0.1.1"))
        .map(|l| format!("{l}\n"))
        .collect();
    if !text.contains("localhost") {
        text.push_str("127.0.0.1\tlocalhost\n");
    }
    text.push_str(&format!("127.0.1.1\t{hostname}\n"));
    if let Err(e) = std::fs::write("/etc/hosts", text) {
        tracing::warn!(error = %e, "could not write /etc/hosts");
    }
}

fn write_resolv_conf(dns: &[Ipv4Addr]) {
    let text: String = dns
        .iter()
        .map(|server| format!("nameserver {server}\n"))
        .collect();
    // Written in place (not renamed over) so a bind-mounted or symlinked resolv.conf works.
    if let Err(e) = std::fs::write("/etc/resolv.conf", text) {
        tracing::warn!(error = %e, "could not write /etc/resolv.conf");
    }
}

/// Syncs file systems and powers the machine off. Only PID 1 may do that: anywhere else (an
/// envd started with `--init` by hand) it must not turn off the host, so the process exits.
pub fn power_off() -> ! {
    nix::unistd::sync();
    if nix::unistd::getpid().as_raw() == 1 {
        // In a child PID namespace this ends the namespace's init instead of the machine.
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    std::process::exit(0);
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("could not open a configuration socket: {0}")]
    Socket(std::io::Error),
    #[error("interface name `{0}` is invalid")]
    BadName(String),
    #[error("{operation} on {device} failed: {source}")]
    Ioctl {
        operation: &'static str,
        device: String,
        source: std::io::Error,
    },
}

const SIOCADDRT: libc::c_ulong = 0x890B;
const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

/// The kernel's `struct rtentry` (not exported by libc for glibc targets).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes, plain data, and the kernel reads the
    // generic form by its family field.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

struct InterfaceConfigurator {
    socket: OwnedFd,
}

impl InterfaceConfigurator {
    fn new() -> Result<Self, NetworkError> {
        // SAFETY: plain socket(2) call; the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetworkError::Socket(std::io::Error::last_os_error()));
        }
        Ok(Self {
            // SAFETY: fd is a fresh descriptor nobody else owns.
            socket: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn request(device: &str) -> Result<libc::ifreq, NetworkError> {
        if device.is_empty() || device.len() >= libc::IFNAMSIZ || device.contains('\0') {
            return Err(NetworkError::BadName(device.to_owned()));
        }
        // SAFETY: ifreq is plain data for which all-zero is valid.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(device.bytes()) {
            *slot = byte as libc::c_char;
        }
        Ok(request)
    }

    fn ioctl(
        &self,
        operation: &'static str,
        code: libc::c_ulong,
        device: &str,
        request: *mut libc::c_void,
    ) -> Result<(), NetworkError> {
        // SAFETY: `request` points at a live, correctly typed structure for `code`.
        let rc = unsafe { libc::ioctl(self.socket.as_raw_fd(), code as _, request) };
        if rc < 0 {
            return Err(NetworkError::Ioctl {
                operation,
                device: device.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn has_ipv4(&self, device: &str) -> Result<bool, NetworkError> {
        let mut request = Self::request(device)?;
        match self.ioctl(
            "SIOCGIFADDR",
            libc::SIOCGIFADDR as _,
            device,
            (&raw mut request).cast(),
        ) {
            Ok(()) => Ok(true),
            Err(NetworkError::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn bring_up(&self, device: &str) -> Result<(), NetworkError> {
        let mut request = Self::request(device)?;
        self.ioctl(
            "SIOCGIFFLAGS",
            libc::SIOCGIFFLAGS as _,
            device,
            (&raw mut request).cast(),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe {
            request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        self.ioctl(
            "SIOCSIFFLAGS",
            libc::SIOCSIFFLAGS as _,
            device,
            (&raw mut request).cast(),
        )
    }

    fn set_address(
        &self,
        device: &str,
        address: Ipv4Addr,
        netmask: Ipv4Addr,
    ) -> Result<(), NetworkError> {
        let mut request = Self::request(device)?;
        request.ifr_ifru.ifru_addr = sockaddr(address);
        self.ioctl(
            "SIOCSIFADDR",
            libc::SIOCSIFADDR as _,
            device,
            (&raw mut request).cast(),
        )?;
        let mut request = Self::request(device)?;
        request.ifr_ifru.ifru_netmask = sockaddr(netmask);
        self.ioctl(
            "SIOCSIFNETMASK",
            libc::SIOCSIFNETMASK as _,
            device,
            (&raw mut request).cast(),
        )
    }

    fn add_default_route(&self, device: &str, gateway: Ipv4Addr) -> Result<(), NetworkError> {
        let name = CString::new(device).map_err(|_| NetworkError::BadName(device.to_owned()))?;
        let mut route = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gateway),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: RTF_UP | RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: name.as_ptr().cast_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        match self.ioctl("SIOCADDRT", SIOCADDRT, device, (&raw mut route).cast()) {
            Err(NetworkError::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            other => other,
        }
    }
}

/// Brings up `lo`, then configures the `ip=` device unless something already gave it an address.
pub fn configure_network(ip: Option<&IpConfig>) -> Result<(), NetworkError> {
    let configurator = InterfaceConfigurator::new()?;
    configurator.bring_up("lo")?;
    let Some(ip) = ip else { return Ok(()) };
    if configurator.has_ipv4(&ip.device)? {
        return Ok(());
    }
    configurator.set_address(&ip.device, ip.client, ip.netmask)?;
    configurator.bring_up(&ip.device)?;
    if let Some(gateway) = ip.gateway {
        configurator.add_default_route(&ip.device, gateway)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guest_kernel_arguments() {
        let args = KernelArgs::parse(
            "console=ttyS0 ip=169.254.0.21::169.254.0.22:255.255.255.252:capsule:eth0:off wrenn.dns=1.1.1.1,9.9.9.9",
        );
        assert_eq!(
            args.ip,
            Some(IpConfig {
                client: Ipv4Addr::new(169, 254, 0, 21),
                gateway: Some(Ipv4Addr::new(169, 254, 0, 22)),
                netmask: Ipv4Addr::new(255, 255, 255, 252),
                hostname: Some("capsule".into()),
                device: "eth0".into(),
            })
        );
        assert_eq!(
            args.dns,
            vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)]
        );
        let bare = KernelArgs::parse("quiet ip=dhcp");
        assert_eq!(bare.ip, None);
        assert_eq!(bare.dns, vec![DEFAULT_DNS]);
        assert_eq!(bare.hostname(), "capsule");
    }
}
