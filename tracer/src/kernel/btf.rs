//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to answer two
//! questions at run time: what are the arguments of a raw tracepoint (its
//! `TP_PROTO`), and where does a struct member live. Raw tracepoint programs read
//! arguments by position, so positions must come from the running kernel.

use std::{collections::HashMap, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("BTF is malformed: {0}")]
    Malformed(&'static str),
}

const KIND_STRUCT: u32 = 4;
const KIND_ENUM: u32 = 6;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// size for structs, referenced type id for ptr/typedef/func_proto(return).
    size_or_type: u32,
    /// (name_off, type id, bit offset) for struct members, (name_off, type id, 0) for params.
    members: Vec<(u32, u32, u32)>,
}

pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<(u32, String), u32>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Self::read(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn read(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|error| BtfError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(0xeb9f) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(4).ok_or(BtfError::Malformed("short header"))? as usize;
        let field = |i: usize| u32_at(8 + 4 * i).ok_or(BtfError::Malformed("short header"));
        let (type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?);
        let types_start = hdr_len + type_off as usize;
        let types_end = types_start + type_len as usize;
        let str_start = hdr_len + str_off as usize;
        let strings = data
            .get(str_start..str_start + str_len as usize)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        if types_end > data.len() {
            return Err(BtfError::Malformed("type section out of bounds"));
        }

        // Type ids start at 1; index 0 stands for void.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut o = types_start;
        while o < types_end {
            let name_off = u32_at(o).ok_or(BtfError::Malformed("truncated type"))?;
            let info = u32_at(o + 4).ok_or(BtfError::Malformed("truncated type"))?;
            let size_or_type = u32_at(o + 8).ok_or(BtfError::Malformed("truncated type"))?;
            o += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl_tag
                3 => {
                    // (element type, index type, number of elements)
                    let triple = (u32_at(o), u32_at(o + 4), u32_at(o + 8));
                    let (Some(elem), Some(index), Some(n)) = triple else {
                        return Err(BtfError::Malformed("truncated array"));
                    };
                    members.push((elem, index, n));
                    12
                }
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let base = o + 12 * m;
                        let triple = (u32_at(base), u32_at(base + 4), u32_at(base + 8));
                        let (Some(n), Some(t), Some(off)) = triple else {
                            return Err(BtfError::Malformed("truncated struct"));
                        };
                        members.push((n, t, off));
                    }
                    12 * vlen
                }
                KIND_ENUM => {
                    for m in 0..vlen {
                        let base = o + 8 * m;
                        let (Some(n), Some(v)) = (u32_at(base), u32_at(base + 4)) else {
                            return Err(BtfError::Malformed("truncated enum"));
                        };
                        members.push((n, v, 0));
                    }
                    8 * vlen
                }
                KIND_FUNC_PROTO => {
                    for p in 0..vlen {
                        let base = o + 8 * p;
                        let (Some(n), Some(t)) = (u32_at(base), u32_at(base + 4)) else {
                            return Err(BtfError::Malformed("truncated func proto"));
                        };
                        members.push((n, t, 0));
                    }
                    8 * vlen
                }
                KIND_DATASEC => {
                    // (variable type id, offset in the section, size)
                    for v in 0..vlen {
                        let base = o + 12 * v;
                        let triple = (u32_at(base), u32_at(base + 4), u32_at(base + 8));
                        let (Some(t), Some(off), Some(size)) = triple else {
                            return Err(BtfError::Malformed("truncated datasec"));
                        };
                        members.push((t, off, size));
                    }
                    12 * vlen
                }
                19 => 12 * vlen, // enum64
                0 | 2 | 7..=13 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            o += extra;
            types.push(Type {
                name_off,
                kind,
                kind_flag: info >> 31 == 1,
                size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate().skip(1) {
            if t.name_off != 0
                && matches!(
                    t.kind,
                    KIND_STRUCT | KIND_TYPEDEF | KIND_FUNC | KIND_ENUM | KIND_DATASEC
                )
            {
                let name = btf.string(t.name_off).to_string();
                btf.by_name.entry((t.kind, name)).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Argument names of raw tracepoint `name` in order (`TP_PROTO`), from the
    /// prototype of the kernel's `__bpf_trace_<name>` function, the one place BTF
    /// keeps parameter names (the `btf_trace_<name>` typedef has types only).
    /// None when this kernel has no such tracepoint or its BTF lacks the function.
    pub fn tracepoint_args(&self, name: &str) -> Option<Vec<String>> {
        let id = *self
            .by_name
            .get(&(KIND_FUNC, format!("__bpf_trace_{name}")))?;
        let proto = self
            .types
            .get(self.types.get(id as usize)?.size_or_type as usize)?;
        if proto.kind != KIND_FUNC_PROTO {
            return None;
        }
        // The first parameter is the tracepoint's private `void *__data`.
        Some(
            proto
                .members
                .iter()
                .skip(1)
                .map(|&(n, _, _)| self.string(n).to_string())
                .collect(),
        )
    }

    /// Whether this kernel's BTF describes `struct name` at all: a kernel
    /// facility that comes with its own struct is there exactly when it is.
    pub fn has_struct(&self, name: &str) -> bool {
        self.by_name.contains_key(&(KIND_STRUCT, name.to_string()))
    }

    /// Whether this kernel's BTF has function `name` (a config option's
    /// code, say `vmemmap_populate` for `CONFIG_SPARSEMEM_VMEMMAP`).
    pub fn has_func(&self, name: &str) -> bool {
        self.by_name.contains_key(&(KIND_FUNC, name.to_string()))
    }

    /// Byte offset of `member` in `struct name` (top-level members only).
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let id = *self.by_name.get(&(KIND_STRUCT, name.to_string()))?;
        let t = self.types.get(id as usize)?;
        let &(_, _, bits) = t
            .members
            .iter()
            .find(|&&(n, _, _)| self.string(n) == member)?;
        // With kind_flag set the low 24 bits are the offset and the top 8 a bitfield size.
        let bits = if t.kind_flag { bits & 0xff_ffff } else { bits };
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl Btf {
    /// Offset of per-CPU variable `var` in the kernel's `.data..percpu`
    /// section (pahole describes per-CPU variables only); None when absent.
    pub fn percpu_var_offset(&self, var: &str) -> Option<u32> {
        let id = *self
            .by_name
            .get(&(KIND_DATASEC, ".data..percpu".to_string()))?;
        let sec = self.types.get(id as usize)?;
        sec.members.iter().find_map(|&(t, off, _)| {
            let v = self.types.get(t as usize)?;
            (v.kind == KIND_VAR && self.string(v.name_off) == var).then_some(off)
        })
    }

    /// Value of enumerator `variant` in `enum name` (e.g. `memory_cgrp_id` in
    /// `cgroup_subsys_id`, which depends on the kernel's config).
    pub fn enum_value(&self, name: &str, variant: &str) -> Option<u32> {
        let id = *self.by_name.get(&(KIND_ENUM, name.to_string()))?;
        let t = self.types.get(id as usize)?;
        t.members
            .iter()
            .find(|&&(n, _, _)| self.string(n) == variant)
            .map(|&(_, v, _)| v)
    }
}

/// What a struct member is, as far as reading kernel memory needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Pointer,
    /// `len` elements of `elem_size` bytes.
    Array {
        elem_size: u32,
        len: u32,
    },
    /// A named (or anonymous) struct or union of `size` bytes.
    Struct {
        name: String,
        size: u32,
    },
    /// An integer or enum of `size` bytes.
    Scalar {
        size: u32,
    },
    Other,
}

/// A member found by [`Btf::member`]: byte offset from the start of the
/// outer struct (anonymous unions and structs looked through) and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub shape: Shape,
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_ENUM64: u32 = 19;

impl Btf {
    /// Type id behind typedefs and const/volatile/restrict/type-tag qualifiers.
    fn resolve(&self, mut id: u32) -> Option<(u32, &Type)> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | 9..=11 | 18 => id = t.size_or_type,
                _ => return Some((id, t)),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<u32> {
        let (_, t) = self.resolve(id)?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => Some(t.size_or_type),
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let &(elem, _, n) = t.members.first()?;
                self.size_of(elem)?.checked_mul(n)
            }
            _ => None,
        }
    }

    fn shape(&self, id: u32) -> Shape {
        let Some((_, t)) = self.resolve(id) else {
            return Shape::Other;
        };
        match t.kind {
            KIND_PTR => Shape::Pointer,
            KIND_ARRAY => match t.members.first() {
                Some(&(elem, _, len)) => match self.size_of(elem) {
                    Some(elem_size) => Shape::Array { elem_size, len },
                    None => Shape::Other,
                },
                None => Shape::Other,
            },
            KIND_STRUCT | KIND_UNION => Shape::Struct {
                name: self.string(t.name_off).to_string(),
                size: t.size_or_type,
            },
            KIND_INT | KIND_ENUM | KIND_ENUM64 => Shape::Scalar {
                size: t.size_or_type,
            },
            _ => Shape::Other,
        }
    }

    fn find_member(&self, t: &Type, member: &str, base_bits: u32, depth: u32) -> Option<Member> {
        self.find_member_typed(t, member, base_bits, depth)
            .map(|(m, _)| m)
    }

    /// Member `member` of `struct name`, looking through anonymous unions and
    /// structs (e.g. `mem_cgroup.memsw`, which shares a union with `swap`).
    pub fn member(&self, name: &str, member: &str) -> Option<Member> {
        let id = *self.by_name.get(&(KIND_STRUCT, name.to_string()))?;
        let t = self.types.get(id as usize)?;
        self.find_member(t, member, 0, 0)
    }

    /// Size of what pointer member `member` of `struct name` points to (e.g.
    /// `mem_cgroup.vmstats_percpu`: the per-CPU struct one CPU's copy is),
    /// looking through typedefs and type tags (`__percpu`). None: no such
    /// member, not a pointer, or a pointee of unknown size.
    pub fn pointee_size(&self, name: &str, member: &str) -> Option<u32> {
        let id = *self.by_name.get(&(KIND_STRUCT, name.to_string()))?;
        let t = self.types.get(id as usize)?;
        let (_, ty) = self.find_member_typed(t, member, 0, 0)?;
        let (_, p) = self.resolve(ty)?;
        (p.kind == KIND_PTR).then_some(())?;
        self.size_of(p.size_or_type).filter(|&n| n > 0)
    }

    /// Size of `struct name`.
    pub fn struct_size(&self, name: &str) -> Option<u32> {
        let id = *self.by_name.get(&(KIND_STRUCT, name.to_string()))?;
        self.size_of(id)
    }

    /// A member reached through named inner members, e.g. `dentry` `d_u.d_alias`
    /// (`d_u` is a named union of an anonymous type) or `inode` `i_sb`.
    pub fn member_path(&self, name: &str, path: &[&str]) -> Option<Member> {
        let id = *self.by_name.get(&(KIND_STRUCT, name.to_string()))?;
        let mut t = self.types.get(id as usize)?;
        let mut offset = 0u32;
        let mut last = None;
        for (i, step) in path.iter().enumerate() {
            let (m, ty) = self.find_member_typed(t, step, 0, 0)?;
            offset += m.offset;
            if i + 1 < path.len() {
                t = self.resolve(ty)?.1;
                if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
                    return None;
                }
            }
            last = Some(Member {
                offset,
                shape: m.shape,
            });
        }
        last
    }

    fn find_member_typed(
        &self,
        t: &Type,
        member: &str,
        base_bits: u32,
        depth: u32,
    ) -> Option<(Member, u32)> {
        if depth > 8 {
            return None;
        }
        for &(n, ty, bits) in &t.members {
            let bits = if t.kind_flag { bits & 0xff_ffff } else { bits };
            let name = self.string(n);
            if name == member {
                let total = base_bits + bits;
                return total.is_multiple_of(8).then(|| {
                    (
                        Member {
                            offset: total / 8,
                            shape: self.shape(ty),
                        },
                        ty,
                    )
                });
            }
            if name.is_empty() {
                if let Some((_, inner)) = self.resolve(ty) {
                    if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                        if let Some(m) =
                            self.find_member_typed(inner, member, base_bits + bits, depth + 1)
                        {
                            return Some(m);
                        }
                    }
                }
            }
        }
        None
    }

    /// Value of enumerator `variant` in whichever enum defines it, named or
    /// anonymous (e.g. `CSS_ONLINE`, which lives in an anonymous enum).
    pub fn enumerator(&self, variant: &str) -> Option<u32> {
        self.types.iter().find_map(|t| {
            if t.kind != KIND_ENUM {
                return None;
            }
            t.members
                .iter()
                .find(|&&(n, _, _)| self.string(n) == variant)
                .map(|&(_, v, _)| v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF: struct kmem_cache { int size @0; char *name @8 }
    /// and func __bpf_trace_kfree(void *__data, unsigned long call_site, const void *ptr).
    fn sample() -> Vec<u8> {
        let strings =
            b"\0int\0kmem_cache\0size\0name\0__bpf_trace_kfree\0__data\0call_site\0ptr\0cgroup_subsys_id\0cpuset_cgrp_id\0memory_cgrp_id\0"
                .to_vec();
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .expect("string in table")
        };
        let mut t: Vec<u32> = Vec::new();
        // 1: int
        t.extend([s("int"), 1 << 24, 4, 32]);
        // 2: struct kmem_cache, 2 members
        t.extend([s("kmem_cache"), (KIND_STRUCT << 24) | 2, 16]);
        t.extend([s("size"), 1, 0, s("name"), 1, 64]);
        // 3: func proto (void, 3 params)
        t.extend([0, (KIND_FUNC_PROTO << 24) | 3, 0]);
        t.extend([s("__data"), 1, s("call_site"), 1, s("ptr"), 1]);
        // 4: func __bpf_trace_kfree -> 3
        t.extend([s("__bpf_trace_kfree"), KIND_FUNC << 24, 3]);
        // 5: enum cgroup_subsys_id { cpuset_cgrp_id = 0, memory_cgrp_id = 4 }
        t.extend([s("cgroup_subsys_id"), (KIND_ENUM << 24) | 2, 4]);
        t.extend([s("cpuset_cgrp_id"), 0, s("memory_cgrp_id"), 4]);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(0xeb9fu16.to_le_bytes());
        out.extend([1u8, 0]);
        out.extend(24u32.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((types.len() as u32).to_le_bytes());
        out.extend((types.len() as u32).to_le_bytes());
        out.extend((strings.len() as u32).to_le_bytes());
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn parses_tracepoint_args_and_members() {
        let btf = Btf::parse(&sample()).expect("parses");
        assert_eq!(
            btf.tracepoint_args("kfree"),
            Some(vec!["call_site".to_string(), "ptr".to_string()])
        );
        assert_eq!(btf.tracepoint_args("kmalloc"), None);
        assert_eq!(btf.member_offset("kmem_cache", "name"), Some(8));
        assert_eq!(btf.member_offset("kmem_cache", "size"), Some(0));
        assert_eq!(btf.member_offset("kmem_cache", "nope"), None);
        assert_eq!(
            btf.enum_value("cgroup_subsys_id", "memory_cgrp_id"),
            Some(4)
        );
        assert_eq!(
            btf.enum_value("cgroup_subsys_id", "cpuset_cgrp_id"),
            Some(0)
        );
        assert_eq!(btf.enum_value("cgroup_subsys_id", "nope"), None);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let good = sample();
        for len in 0..good.len() {
            let _ = Btf::parse(&good[..len]);
        }
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(Btf::parse(&bad).is_err());
    }

    #[test]
    fn running_kernel_kmem_tracepoints() {
        let btf = Btf::from_sys_fs().expect("this machine has /sys/kernel/btf/vmlinux");
        let kfree = btf.tracepoint_args("kfree").expect("kfree");
        assert_eq!(kfree, ["call_site", "ptr"]);
        let kmalloc = btf.tracepoint_args("kmalloc").expect("kmalloc");
        assert_eq!(
            &kmalloc[..5],
            ["call_site", "ptr", "bytes_req", "bytes_alloc", "gfp_flags"]
        );
        assert!(btf.member_offset("kmem_cache", "size").is_some());
        assert!(btf.member_offset("kmem_cache", "name").is_some());
        // What `leaktrace memcg` walks from a task to its memory cgroup's id.
        assert!(btf
            .enum_value("cgroup_subsys_id", "memory_cgrp_id")
            .is_some());
        // What the dying-memcg walk reads (memcg/walk.rs).
        let memsw = btf.member("mem_cgroup", "memsw").expect("mem_cgroup.memsw");
        let swap = btf.member("mem_cgroup", "swap").expect("mem_cgroup.swap");
        assert_eq!(memsw.offset, swap.offset, "one union");
        assert!(matches!(
            btf.member("mem_cgroup", "memory").map(|m| m.shape),
            Some(Shape::Struct { ref name, .. }) if name == "page_counter"
        ));
        assert_eq!(
            btf.member("cgroup_subsys_state", "parent").map(|m| m.shape),
            Some(Shape::Pointer)
        );
        assert!(btf.enumerator("CSS_ONLINE").is_some());
        let alias = btf
            .member_path("dentry", &["d_u", "d_alias"])
            .expect("d_u.d_alias");
        let d_u = btf.member("dentry", "d_u").expect("d_u");
        assert_eq!(alias.offset, d_u.offset);
        assert_eq!(
            btf.member_path("dentry", &["d_name", "name"])
                .map(|m| m.shape),
            Some(Shape::Pointer)
        );
        for (s, m) in [
            ("task_struct", "cgroups"),
            ("css_set", "subsys"),
            ("cgroup_subsys_state", "cgroup"),
            ("cgroup", "kn"),
            ("kernfs_node", "id"),
        ] {
            assert!(btf.member_offset(s, m).is_some(), "{s}.{m}");
        }
    }
}
