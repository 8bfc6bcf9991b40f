//! Endpoint devices: persistent taps (tun ioctl) and veth pairs with the peer in a guest
//! network namespace (rtnetlink).
//!
//! Decisions:
//! - Taps are created persistent with `IFF_TAP | IFF_NO_PI` and no vnet header; the VMM opens
//!   them later with its own flags (the kernel lets the opener choose the vnet header). The
//!   agent keeps no fd open.
//! - IPv6 is disabled on the host side of every endpoint device before it goes up, so the host
//!   stack never emits router solicitations or MLD reports towards guests.
//! - Names are validated here (1 to 15 bytes, no '/', ':' or whitespace) so bad input gets a
//!   clear error instead of an ioctl failure.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan};

use crate::types::MacAddr;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid device name {0:?}: 1-15 bytes, no '/', ':' or whitespace")]
    InvalidName(String),
    #[error("device {0} already exists")]
    Exists(String),
    #[error("device {0} does not exist")]
    NotFound(String),
    #[error("device {name} did not come up (operstate {state})")]
    NotUp { name: String, state: String },
    #[error("opening /dev/net/tun: {0} (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    #[error("creating tap {name}: {source}")]
    CreateTap { name: String, source: io::Error },
    #[error("opening network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("creating {kind} {name}: {source}")]
    CreateLink {
        kind: &'static str,
        name: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("renaming {name} to {new}: {source}")]
    Rename {
        name: String,
        new: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("setting {name} up: {source}")]
    SetUp {
        name: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("deleting {name}: {source}")]
    Delete {
        name: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("deleting tap {name}: {source}")]
    DeleteTap { name: String, source: io::Error },
    #[error("setting {name} up (ioctl): {source}")]
    SetUpNow { name: String, source: io::Error },
    #[error("disabling IPv6 on {name}: {source}")]
    DisableIpv6 { name: String, source: io::Error },
    #[error("opening a netlink socket: {0}")]
    Netlink(#[source] io::Error),
    #[error("missing capability: {0} needs CAP_NET_ADMIN (run as root)")]
    MissingCapability(String),
}

/// Creates, configures and deletes endpoint devices.
pub struct Devices {
    handle: rtnetlink::Handle,
    /// The last number [`Devices::unused_name`] handed out.
    last_name: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices").finish_non_exhaustive()
    }
}

impl Devices {
    /// A device name `<prefix><n>` (n in base 36, counting up for this process) that no device
    /// on the host has now. The name is not reserved: creating the device is what takes it.
    pub fn unused_name(&self, prefix: &str) -> String {
        use std::sync::atomic::Ordering;
        loop {
            let n = self.last_name.fetch_add(1, Ordering::Relaxed) + 1;
            let name = format!("{prefix}{}", crate::types::radix36(n));
            if ifindex_of(&name).is_none() {
                return name;
            }
        }
    }

    /// Opens a netlink connection; must be called inside a tokio runtime.
    pub fn new() -> Result<Self, DeviceError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(DeviceError::Netlink)?;
        tokio::spawn(conn);
        Ok(Devices {
            handle,
            last_name: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Creates a persistent tap owned by `owner_uid` (or root) and returns its ifindex.
    pub fn create_tap(&self, name: &str, owner_uid: Option<u32>) -> Result<u32, DeviceError> {
        let (ifindex, held) = self.create_tap_held(name, owner_uid)?;
        held.persist()?;
        Ok(ifindex)
    }

    /// Creates a tap that exists only while the returned [`HeldTap`] lives: until
    /// [`HeldTap::persist`], a crash (or a drop) removes it with its links, so no half-made
    /// device outlives a process killed in the middle of setting it up.
    pub fn create_tap_held(
        &self,
        name: &str,
        owner_uid: Option<u32>,
    ) -> Result<(u32, HeldTap), DeviceError> {
        validate_name(name)?;
        if ifindex_of(name).is_some() {
            return Err(DeviceError::Exists(name.into()));
        }
        let err = |source: io::Error| tap_error(name, source);
        let fd = open_tap(name).map_err(|e| match e {
            TapOpenError::Tun(e) => DeviceError::OpenTun(e),
            TapOpenError::SetIff(e) => err(e),
        })?;
        if let Some(uid) = owner_uid {
            set_tap_owner(&fd, uid).map_err(err)?;
        }
        let idx = ifindex_of(name).ok_or_else(|| DeviceError::NotFound(name.into()))?;
        disable_ipv6(name)?;
        Ok((
            idx,
            HeldTap {
                fd,
                name: name.into(),
            },
        ))
    }

    /// Renames a device (it must be down) and, for a tap, optionally sets its owner.
    pub async fn rename_tap(
        &self,
        old: &str,
        ifindex: u32,
        new: &str,
        owner_uid: Option<u32>,
    ) -> Result<(), DeviceError> {
        validate_name(new)?;
        if ifindex_of(new).is_some() {
            return Err(DeviceError::Exists(new.into()));
        }
        let msg = LinkUnspec::new_with_index(ifindex)
            .name(new.to_string())
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|source| match errno(&source) {
                Some(libc::EEXIST) => DeviceError::Exists(new.into()),
                _ => DeviceError::Rename {
                    name: old.into(),
                    new: new.into(),
                    source: Box::new(source),
                },
            })?;
        if let Some(uid) = owner_uid {
            let err = |source| DeviceError::CreateTap {
                name: new.into(),
                source,
            };
            let fd = open_tap(new).map_err(|e| match e {
                TapOpenError::Tun(e) => DeviceError::OpenTun(e),
                TapOpenError::SetIff(e) => err(e),
            })?;
            set_tap_owner(&fd, uid).map_err(err)?;
        }
        Ok(())
    }

    /// Creates a veth pair `name` (host side) / `peer` (moved into the namespace at
    /// `peer_netns`, with MAC `peer_mac`) and returns the host side's ifindex.
    pub async fn create_veth(
        &self,
        name: &str,
        peer: &str,
        peer_mac: MacAddr,
        peer_netns: &Path,
    ) -> Result<u32, DeviceError> {
        validate_name(name)?;
        validate_name(peer)?;
        if ifindex_of(name).is_some() {
            return Err(DeviceError::Exists(name.into()));
        }
        let ns = std::fs::File::open(peer_netns).map_err(|source| DeviceError::OpenNetns {
            path: peer_netns.into(),
            source,
        })?;
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .address(peer_mac.0.to_vec())
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        let idx = self.add_link("veth", name, msg).await;
        drop(ns);
        idx
    }

    /// Adds the link `msg` describes (a `kind` device named `name`), then turns IPv6 off on
    /// it; returns its ifindex.
    async fn add_link(
        &self,
        kind: &'static str,
        name: &str,
        msg: netlink_packet_route::link::LinkMessage,
    ) -> Result<u32, DeviceError> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|source| match errno(&source) {
                Some(libc::EEXIST) => DeviceError::Exists(name.into()),
                Some(libc::EPERM) => {
                    DeviceError::MissingCapability(format!("creating {kind} {name}"))
                }
                _ => DeviceError::CreateLink {
                    kind,
                    name: name.into(),
                    source: Box::new(source),
                },
            })?;
        let idx = ifindex_of(name).ok_or_else(|| DeviceError::NotFound(name.into()))?;
        disable_ipv6(name)?;
        Ok(idx)
    }

    /// Creates the overlay's VXLAN device `name` in external (collect_md) mode: the programs
    /// set each frame's tunnel (`dataplane-ebpf/src/overlay.rs`), so it has no remote, no
    /// learning and no FDB; it listens on UDP `port` and sends from `local`. Returns its
    /// ifindex.
    pub async fn create_vxlan(
        &self,
        name: &str,
        port: u16,
        local: std::net::Ipv4Addr,
    ) -> Result<u32, DeviceError> {
        validate_name(name)?;
        if ifindex_of(name).is_some() {
            return Err(DeviceError::Exists(name.into()));
        }
        let msg = LinkMessageBuilder::<LinkVxlan>::new(name)
            .port(port)
            .local(local)
            .learning(false)
            .collect_metadata(true)
            .build();
        self.add_link("vxlan", name, msg).await
    }

    /// Sets a device administratively up.
    pub async fn set_up(&self, name: &str, ifindex: u32) -> Result<(), DeviceError> {
        let msg = LinkUnspec::new_with_index(ifindex).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|source| DeviceError::SetUp {
                name: name.into(),
                source: Box::new(source),
            })
    }

    /// Deletes a device (for a veth, both ends). A device that is already gone is not an error.
    pub async fn delete(&self, name: &str, ifindex: u32) -> Result<(), DeviceError> {
        match self.handle.link().del(ifindex).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(source) => Err(DeviceError::Delete {
                name: name.into(),
                source: Box::new(source),
            }),
        }
    }

    /// Names of all host devices whose name starts with `prefix`.
    pub async fn names_with_prefix(&self, prefix: &str) -> Result<Vec<(String, u32)>, DeviceError> {
        let mut out = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links
            .try_next()
            .await
            .map_err(|source| DeviceError::Delete {
                name: prefix.into(),
                source: Box::new(source),
            })?
        {
            for attr in &msg.attributes {
                if let netlink_packet_route::link::LinkAttribute::IfName(n) = attr {
                    if n.starts_with(prefix) {
                        out.push((n.clone(), msg.header.index));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// ifindex of a host device, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    ifindex_of(name)
}

fn ifindex_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Name of a host device by ifindex, if it exists.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

pub fn validate_name(name: &str) -> Result<(), DeviceError> {
    crate::config::check_device_name(name).map_err(|_| DeviceError::InvalidName(name.into()))
}

/// A tap that is not yet persistent (see [`Devices::create_tap_held`]): the kernel deletes it
/// when this, its only queue, is closed.
pub struct HeldTap {
    fd: OwnedFd,
    name: String,
}

impl std::fmt::Debug for HeldTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldTap").finish_non_exhaustive()
    }
}

impl HeldTap {
    /// Makes the tap persistent and lets go of it: it now outlives this process.
    pub fn persist(self) -> Result<(), DeviceError> {
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(tap_error(&self.name, io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Whether `name` is administratively up (`IFF_UP`); `false` if it does not exist.
pub fn is_up(name: &str) -> bool {
    if validate_name(name).is_err() {
        return false;
    }
    let Ok(sock) = ioctl_socket() else {
        return false;
    };
    let mut req = IfReq::new(name, 0);
    // SAFETY: SIOCGIFFLAGS reads and writes an ifreq that we own for the call's duration.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    rc == 0 && req.flags & libc::IFF_UP as libc::c_short != 0
}

/// A socket for device ioctls, in the calling thread's network namespace.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The MAC address of `name` (`SIOCGIFHWADDR`). Device attributes are read with ioctls on a
/// socket, never from `/sys/class/net`: sysfs shows the devices of the namespace it was
/// mounted in, which is not the agent's when the agent runs in a namespace of its own.
pub fn mac_of(name: &str) -> io::Result<crate::types::MacAddr> {
    validate_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let sock = ioctl_socket()?;
    #[repr(C)]
    struct IfReqHw {
        name: [libc::c_char; libc::IF_NAMESIZE],
        family: u16,
        data: [u8; 14],
        _pad: [u8; 8],
    }
    let mut req = IfReqHw {
        name: [0; libc::IF_NAMESIZE],
        family: 0,
        data: [0; 14],
        _pad: [0; 8],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads and writes an ifreq (40 bytes) that we own for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&req.data[..6]);
    Ok(crate::types::MacAddr(mac))
}

/// The MTU of `name` (`SIOCGIFMTU`, in the calling thread's namespace; see [`mac_of`]).
pub fn mtu(name: &str) -> io::Result<u32> {
    validate_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let sock = ioctl_socket()?;
    #[repr(C)]
    struct IfReqMtu {
        name: [libc::c_char; libc::IF_NAMESIZE],
        mtu: libc::c_int,
        _pad: [u8; 20],
    }
    let mut req = IfReqMtu {
        name: [0; libc::IF_NAMESIZE],
        mtu: 0,
        _pad: [0; 20],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads and writes an ifreq (40 bytes) that we own for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(req.mtu).map_err(|_| io::Error::other(format!("MTU {} of {name}", req.mtu)))
}

/// The driver of `name` (`ETHTOOL_GDRVINFO`), e.g. `tun` or `veth`.
fn driver_of(name: &str) -> io::Result<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReqData {
        name: [libc::c_char; libc::IF_NAMESIZE],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    let sock = ioctl_socket()?;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReqData {
        name: [0; libc::IF_NAMESIZE],
        data: &mut info,
        _pad: [0; 16],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most `ethtool_drvinfo` (196 bytes,
    // the size of `DrvInfo`) through the pointer in an ifreq we own; both outlive the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Sets `name` administratively up without netlink (so from synchronous code).
pub fn set_up_now(name: &str) -> Result<(), DeviceError> {
    validate_name(name)?;
    let err = |source| DeviceError::SetUpNow {
        name: name.into(),
        source,
    };
    // SAFETY: socket() takes constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq::new(name, 0);
    // SAFETY: SIOCGIFFLAGS reads and writes an ifreq that we own for the call's duration.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq that we own for the call's duration.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether `name` is a tun/tap device.
pub fn is_tap(name: &str) -> bool {
    validate_name(name).is_ok() && driver_of(name).is_ok_and(|d| d == "tun")
}

/// Deletes the persistent tap `name` without netlink (so from synchronous code): attaches a
/// queue, clears the persist flag and closes the queue, upon which the kernel unregisters the
/// device. A tap that no longer exists is not an error.
pub fn delete_tap_now(name: &str) -> Result<(), DeviceError> {
    validate_name(name)?;
    if ifindex_of(name).is_none() {
        return Ok(());
    }
    let err = |source| DeviceError::DeleteTap {
        name: name.into(),
        source,
    };
    let fd = match open_tap(name) {
        Ok(fd) => fd,
        Err(TapOpenError::Tun(e)) => return Err(DeviceError::OpenTun(e)),
        Err(TapOpenError::SetIff(e)) => return Err(err(e)),
    };
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 0 as libc::c_ulong) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    drop(fd);
    Ok(())
}

fn tap_error(name: &str, source: io::Error) -> DeviceError {
    match source.raw_os_error() {
        Some(libc::EPERM) => DeviceError::MissingCapability(format!("creating tap {name}")),
        Some(libc::EBUSY) | Some(libc::EEXIST) => DeviceError::Exists(name.into()),
        _ => DeviceError::CreateTap {
            name: name.into(),
            source,
        },
    }
}

fn disable_ipv6(name: &str) -> Result<(), DeviceError> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => Ok(()),
        // IPv6 compiled out or disabled at boot: nothing to disable.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DeviceError::DisableIpv6 {
            name: name.into(),
            source,
        }),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

enum TapOpenError {
    Tun(io::Error),
    SetIff(io::Error),
}

/// Opens a queue of the existing tap `name` as a VMM does (no packet info, no vnet header),
/// optionally non-blocking. Reading it receives what the dataplane delivers to the guest;
/// writing it is the guest sending. Used by VMM drivers and by tests acting as guests.
pub fn open_tap_queue(name: &str, nonblocking: bool) -> Result<OwnedFd, DeviceError> {
    validate_name(name)?;
    if ifindex_of(name).is_none() {
        return Err(DeviceError::NotFound(name.into()));
    }
    open_tap_with(name, nonblocking).map_err(|e| match e {
        TapOpenError::Tun(e) => DeviceError::OpenTun(e),
        TapOpenError::SetIff(source) => DeviceError::CreateTap {
            name: name.into(),
            source,
        },
    })
}

/// Waits until `name`'s operational state is "up" (`IF_OPER_UP`: for a tap, a queue is
/// attached and the kernel's link watch has activated it; frames sent to the tap before that
/// are dropped; `IFF_RUNNING` is no substitute, it is also set in the "unknown" state before).
/// Bounded by `timeout`; the kernel offers no wait primitive for this short transition, so
/// it asks again (`RTM_GETLINK`), yielding in between.
pub fn wait_until_up(name: &str, timeout: std::time::Duration) -> Result<(), DeviceError> {
    validate_name(name)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let ifindex = ifindex_of(name).ok_or_else(|| DeviceError::NotFound(name.into()))?;
        let state = operstate(ifindex).map_err(|_| DeviceError::NotFound(name.into()))?;
        if state == IF_OPER_UP {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(DeviceError::NotUp {
                name: name.into(),
                state: format!("operstate {state}"),
            });
        }
        std::thread::yield_now();
    }
}

const IF_OPER_UP: u8 = 6;

/// The operational state (`IFLA_OPERSTATE`) of the device `ifindex`, asked with one
/// synchronous `RTM_GETLINK` on a netlink socket of the calling thread's namespace.
fn operstate(ifindex: u32) -> io::Result<u8> {
    const IFLA_OPERSTATE: u16 = 16;
    // SAFETY: socket() takes constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // nlmsghdr (16 bytes) + ifinfomsg (16 bytes).
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = libc::AF_UNSPEC as u8;
    req[20..24].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    // SAFETY: `req` is valid for its length; the kernel routes it (pid 0).
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 16384];
    // SAFETY: `buf` is valid and writable for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let msg = &buf[..n as usize];
    let bad = || io::Error::other("unexpected RTM_GETLINK answer");
    if msg.len() < 32 {
        return Err(bad());
    }
    let kind = u16::from_ne_bytes([msg[4], msg[5]]);
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
        return Err(io::Error::from_raw_os_error(-errno));
    }
    let len = (u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize).min(msg.len());
    let mut at = 32;
    while at + 4 <= len {
        let alen = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
        let atype = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]) & 0x3fff;
        if alen < 4 || at + alen > len {
            break;
        }
        if atype == IFLA_OPERSTATE && alen >= 5 {
            return Ok(msg[at + 4]);
        }
        at += (alen + 3) & !3;
    }
    Err(bad())
}

/// Opens (creating if needed) the tap `name` without a vnet header; returns the queue fd.
fn open_tap(name: &str) -> Result<OwnedFd, TapOpenError> {
    open_tap_with(name, false)
}

fn open_tap_with(name: &str, nonblocking: bool) -> Result<OwnedFd, TapOpenError> {
    let flags = libc::O_RDWR | libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
    // SAFETY: the path is a valid NUL-terminated string; the returned fd is checked.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), flags) };
    if raw < 0 {
        return Err(TapOpenError::Tun(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI);
    // SAFETY: TUNSETIFF reads and writes an ifreq that we own for the call's duration.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(TapOpenError::SetIff(io::Error::last_os_error()));
    }
    Ok(fd)
}

fn set_tap_owner(fd: &OwnedFd, uid: u32) -> io::Result<()> {
    // SAFETY: TUNSETOWNER takes an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOWNER, uid as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IF_NAMESIZE],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> Self {
        let mut r = IfReq {
            name: [0; libc::IF_NAMESIZE],
            flags,
            _pad: [0; 22],
        };
        for (d, s) in r.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["atl0", "a", "atl-123456789ab"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "atl-123456789abc", "a/b", "a:b", "a b", ".", ".."] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
