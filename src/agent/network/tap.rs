//! Persistent TAP devices. The kernel creates TUN/TAP devices only through `/dev/net/tun`
//! (rtnetlink refuses them), so this is the one ioctl path of the module.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use super::SystemError;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);

/// Creates the TAP device `name` in the calling thread's network namespace (the device lands
/// where `/dev/net/tun` was opened) and makes it outlive this call, as `ip tuntap add mode tap`
/// does: no packet-information header, no owner, so the VMM opens it later by name.
pub(super) fn create_persistent(name: &str) -> Result<(), SystemError> {
    let action = |what: &str| format!("{what} TAP device {name}");
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(SystemError::Os {
            action: action("naming"),
            errno: nix::errno::Errno::EINVAL,
        });
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| SystemError::io(action("opening /dev/net/tun for"), e))?;
    // SAFETY: ifreq is plain data for which all-zero is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `request` a live ifreq with a
    // NUL-terminated name, which is what TUNSETIFF reads.
    unsafe { tun_set_iff(tun.as_raw_fd(), &request) }.map_err(|errno| SystemError::Os {
        action: action("creating"),
        errno,
    })?;
    // SAFETY: TUNSETPERSIST takes its flag by value on a descriptor attached by TUNSETIFF.
    unsafe { tun_set_persist(tun.as_raw_fd(), 1) }.map_err(|errno| SystemError::Os {
        action: action("making persistent"),
        errno,
    })?;
    Ok(())
}
