//! What the `kfree_skb` program needs to know of the running kernel, read from its BTF.
//!
//! Decisions:
//! - **Offsets at load, not CO-RE.** aya 0.14 emits no CO-RE relocations for Rust programs,
//!   and its BTF types are private to it, so the agent reads `/sys/kernel/btf/vmlinux` itself
//!   (the format is a header, fixed-size type records with per-kind trailers, and a string
//!   table) and hands the program the byte offsets of the few fields it reads
//!   ([`KfreeSkbConfig`]), set in its read-only global when the object is loaded. The values
//!   belong to the loaded program: an upgrade or a new kernel (a reboot clears the pins)
//!   loads the program again with fresh offsets.
//! - **Refuse, never guess.** A field is found by name, through anonymous structs and unions
//!   (the kernel's `struct_group`s and unions), and must be byte-aligned, not a bitfield, and
//!   of the size the program reads; otherwise loading fails with [`DataplaneError::KernelBtf`]
//!   naming the field.
//! - Parsed once per process (about 6 MB here): tests and benchmarks create many dataplanes.

use std::{io, os::unix::fs::MetadataExt, sync::OnceLock};

use aya::{programs::ProgramError, EbpfError};

use atoll_dataplane_common::KfreeSkbConfig;

use super::error::DataplaneError;

/// The running kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The configuration of the `kfree_skb` program for this kernel and this process's network
/// namespace.
pub fn kfree_skb_config() -> Result<KfreeSkbConfig, DataplaneError> {
    static LAYOUT: OnceLock<Result<KfreeSkbConfig, String>> = OnceLock::new();
    let mut config = LAYOUT
        .get_or_init(|| {
            let data = std::fs::read(VMLINUX_BTF).map_err(|e| format!("reading it: {e}"))?;
            layout_from(&Btf::parse(&data)?)
        })
        .clone()
        .map_err(|problem| DataplaneError::KernelBtf {
            btf: VMLINUX_BTF,
            problem,
        })?;
    config.netns_inum = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| DataplaneError::KernelBtf {
            btf: VMLINUX_BTF,
            problem: format!("reading /proc/self/ns/net: {e}"),
        })?
        .ino() as u32;
    Ok(config)
}

fn layout_from(btf: &Btf) -> Result<KfreeSkbConfig, String> {
    let ptr = std::mem::size_of::<usize>() as u32;
    Ok(KfreeSkbConfig {
        skb_dev: btf.field("sk_buff", &["dev"], ptr)?,
        skb_len: btf.field("sk_buff", &["len"], 4)?,
        skb_protocol: btf.field("sk_buff", &["protocol"], 2)?,
        skb_vlan_all: btf.field("sk_buff", &["vlan_all"], 4)?,
        dev_ifindex: btf.field("net_device", &["ifindex"], 4)?,
        dev_net: btf.field("net_device", &["nd_net", "net"], ptr)?,
        net_inum: btf.field("net", &["ns", "inum"], 4)?,
        reason_not_specified: btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NOT_SPECIFIED")?,
        netns_inum: 0,
    })
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One type record: its header words and where its trailer starts.
#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    trailer: usize,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }

    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

/// A parsed BTF blob: type records by id (id 0 is `void`) and the string table.
struct Btf<'a> {
    types: Vec<Type>,
    type_data: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, String> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("truncated at byte {at}"))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, String> {
        if data.get(0..2) != Some(&0xeb9fu16.to_le_bytes()[..]) {
            return Err("not little-endian BTF (bad magic)".into());
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let section = |off: usize, len: usize| -> Result<&'a [u8], String> {
            let start = hdr_len + u32_at(data, off)? as usize;
            let len = u32_at(data, len)? as usize;
            data.get(start..start + len)
                .ok_or_else(|| "a section lies beyond the data".to_string())
        };
        let type_data = section(8, 12)?;
        let strings = section(16, 20)?;
        let mut types = vec![Type {
            name_off: 0,
            info: 0,
            size_or_type: 0,
            trailer: 0,
        }];
        let mut at = 0;
        while at < type_data.len() {
            let t = Type {
                name_off: u32_at(type_data, at)?,
                info: u32_at(type_data, at + 4)?,
                size_or_type: u32_at(type_data, at + 8)?,
                trailer: at + 12,
            };
            let extra = match t.kind() {
                KIND_INT | 14 | 17 => 4,
                3 => 12,
                KIND_STRUCT | KIND_UNION | 15 | KIND_ENUM64 => 12 * t.vlen(),
                KIND_ENUM | 13 => 8 * t.vlen(),
                KIND_PTR | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12
                | 16 | KIND_TYPE_TAG => 0,
                k => return Err(format!("unknown type kind {k} at type {}", types.len())),
            };
            types.push(t);
            at = t.trailer + extra;
        }
        Ok(Btf {
            types,
            type_data,
            strings,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    fn get(&self, id: u32) -> Result<Type, String> {
        self.types
            .get(id as usize)
            .copied()
            .ok_or_else(|| format!("no type {id}"))
    }

    /// `id` with typedefs and qualifiers removed.
    fn resolve(&self, mut id: u32) -> Result<(u32, Type), String> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok((id, t)),
            }
        }
        Err(format!("type {id}: typedef chain too long"))
    }

    fn size(&self, id: u32) -> Result<u32, String> {
        let (_, t) = self.resolve(id)?;
        match t.kind() {
            KIND_PTR => Ok(std::mem::size_of::<usize>() as u32),
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => Ok(t.size_or_type),
            k => Err(format!("type {id} of kind {k} has no size here")),
        }
    }

    /// The struct named `name`.
    fn named_struct(&self, name: &str) -> Result<u32, String> {
        (1..self.types.len() as u32)
            .find(|id| {
                let t = self.types[*id as usize];
                t.kind() == KIND_STRUCT && self.name(t.name_off) == name.as_bytes()
            })
            .ok_or_else(|| format!("no struct {name}"))
    }

    /// (bit offset, type) of member `name` of the struct or union `id`, looking through
    /// anonymous members.
    fn member(&self, id: u32, name: &str) -> Result<Option<(u32, u32)>, String> {
        let (_, t) = self.resolve(id)?;
        if t.kind() != KIND_STRUCT && t.kind() != KIND_UNION {
            return Err(format!("type {id} is not a struct or union"));
        }
        for i in 0..t.vlen() {
            let at = t.trailer + 12 * i;
            let (m_name, m_type, m_off) = (
                u32_at(self.type_data, at)?,
                u32_at(self.type_data, at + 4)?,
                u32_at(self.type_data, at + 8)?,
            );
            let (bit_off, bitfield) = if t.kind_flag() {
                (m_off & 0xff_ffff, m_off >> 24)
            } else {
                (m_off, 0)
            };
            let m_name = self.name(m_name);
            if m_name == name.as_bytes() {
                if bitfield != 0 {
                    return Err(format!("{name} is a bitfield"));
                }
                return Ok(Some((bit_off, m_type)));
            }
            if m_name.is_empty() {
                if let Some((inner, ty)) = self.member(m_type, name)? {
                    return Ok(Some((bit_off + inner, ty)));
                }
            }
        }
        Ok(None)
    }

    /// Byte offset of `strukt.path[0].path[1]…` (nested structs, not pointers), whose type
    /// must be `size` bytes.
    fn field(&self, strukt: &str, path: &[&str], size: u32) -> Result<u32, String> {
        let what = format!("{strukt}.{}", path.join("."));
        let mut ty = self.named_struct(strukt)?;
        let mut bits = 0;
        for name in path {
            let (off, member_ty) = self
                .member(ty, name)?
                .ok_or_else(|| format!("{what}: no member {name}"))?;
            bits += off;
            ty = member_ty;
        }
        if bits % 8 != 0 {
            return Err(format!("{what} is not byte-aligned"));
        }
        let actual = self.size(ty)?;
        if actual != size {
            return Err(format!("{what} is {actual} bytes, expected {size}"));
        }
        Ok(bits / 8)
    }

    /// The value of `variant` of the enum named `name`.
    fn enum_value(&self, name: &str, variant: &str) -> Result<u32, String> {
        for t in &self.types[1..] {
            if t.kind() != KIND_ENUM || self.name(t.name_off) != name.as_bytes() {
                continue;
            }
            for i in 0..t.vlen() {
                let at = t.trailer + 8 * i;
                if self.name(u32_at(self.type_data, at)?) == variant.as_bytes() {
                    return u32_at(self.type_data, at + 4);
                }
            }
            return Err(format!("enum {name} has no {variant}"));
        }
        Err(format!("no enum {name}"))
    }
}

pub(super) fn tcx_supported() -> bool {
    aya::util::KernelVersion::current()
        .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
        .unwrap_or(false)
}

pub(super) fn permission_error(e: &EbpfError) -> Option<io::Error> {
    // aya wraps the syscall's io::Error a few levels deep; EPERM anywhere means no CAP_BPF.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.raw_os_error() == Some(libc::EPERM) {
                return Some(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        if let Some(sys) = err.downcast_ref::<aya::sys::SyscallError>() {
            if sys.io_error.raw_os_error() == Some(libc::EPERM) {
                return Some(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        cur = err.source();
    }
    None
}

pub(super) fn attach_error(
    program: &'static str,
    device: &str,
    source: ProgramError,
) -> DataplaneError {
    let errno = match &source {
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EPERM) => DataplaneError::MissingCapability {
            operation: format!("attaching {program} to {device}"),
            source: io::Error::from_raw_os_error(libc::EPERM),
        },
        // Kernels before 6.6 do not know BPF_TCX_INGRESS/EGRESS.
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if !tcx_supported() => {
            DataplaneError::KernelFeatureMissing {
                feature: "TCX (Linux >= 6.6)",
                source: Box::new(source),
            }
        }
        _ => DataplaneError::Attach {
            program,
            device: device.into(),
            source: Box::new(source),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against this machine's kernel: the offsets `bpftool btf dump` gives for 6.18 are found
    /// through the anonymous unions and `struct_group`s.
    #[test]
    fn the_running_kernels_fields_are_found() {
        // The agent needs the kernel's BTF (its kfree_skb program): a kernel without it fails
        // here, loudly.
        let data = std::fs::read(VMLINUX_BTF).expect("reading the running kernel's BTF");
        let btf = Btf::parse(&data).expect("parsing vmlinux BTF");
        let c = layout_from(&btf).expect("every field");
        // `dev` shares a union inside the first anonymous union with `next` and `prev`.
        assert_eq!(c.skb_dev, 16);
        assert_eq!(c.reason_not_specified, 2);
        assert!(c.skb_len > c.skb_dev && c.skb_protocol > c.skb_len, "{c:?}");
        assert_eq!(
            btf.field("sk_buff", &["pkt_type"], 1).unwrap_err(),
            "pkt_type is a bitfield"
        );
        assert!(btf.field("sk_buff", &["len"], 8).is_err());
        assert!(btf.field("sk_buff", &["no_such_field"], 4).is_err());
    }
}
