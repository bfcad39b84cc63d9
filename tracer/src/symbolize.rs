//! Addresses -> names, with blazesym: kernel frames through kallsyms, user frames
//! through the process's own mappings (`/proc/PID/map_files`, so binaries inside
//! containers resolve). Results are cached per address. A frame we cannot name is
//! shown as `module+0xoffset` or a bare address, never as a guess.

use std::{collections::HashMap, path::Path};

use blazesym::{
    symbolize::{
        source::{Kernel, Process, Source},
        Input, Symbolized, Symbolizer as Blaze,
    },
    MaybeDefault, Pid,
};

pub struct Symbolizer {
    blaze: Blaze,
    kernel: HashMap<u64, String>,
    user: HashMap<(u32, u64), String>,
    /// User lookups since blazesym's caches were last dropped.
    user_lookups: usize,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Symbolizer {
            blaze: Blaze::builder().enable_code_info(false).build(),
            kernel: HashMap::new(),
            user: HashMap::new(),
            user_lookups: 0,
        }
    }

    pub fn kernel_frames(&mut self, addrs: &[u64]) -> Vec<String> {
        let missing: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.kernel.contains_key(a))
            .collect();
        if !missing.is_empty() {
            let src = Source::Kernel(Kernel {
                kallsyms: MaybeDefault::Default,
                // vmlinux lookup would scan /boot and /usr/lib/debug on every call for
                // a file most nodes do not have; kallsyms names every kernel function.
                vmlinux: MaybeDefault::None,
                debug_syms: false,
                ..Kernel::default()
            });
            let names = self.resolve(&src, &missing, |addr| format!("[kernel] {addr:#x}"));
            self.kernel.extend(missing.into_iter().zip(names));
        }
        addrs.iter().map(|a| self.kernel[a].clone()).collect()
    }

    /// Call while the process is alive; afterwards only cached frames resolve.
    pub fn user_frames(&mut self, tgid: u32, addrs: &[u64]) -> Vec<String> {
        let missing: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.user.contains_key(&(tgid, *a)))
            .collect();
        if !missing.is_empty() {
            self.user_lookups += 1;
            // ELF symbols name every function; DWARF would add inlined frames
            // at the price of parsing debug info per binary, per process.
            let src = Source::Process(Process {
                debug_syms: false,
                perf_map: false,
                ..Process::new(Pid::from(tgid))
            });
            let maps = read_maps(tgid);
            let names = self.resolve(&src, &missing, |addr| module_offset(&maps, addr));
            self.user
                .extend(missing.into_iter().map(|a| (tgid, a)).zip(names));
        }
        addrs
            .iter()
            .map(|a| self.user[&(tgid, *a)].clone())
            .collect()
    }

    /// blazesym caches every binary it parsed, keyed by path; through
    /// /proc/PID/map_files each process is a new path, so with many processes
    /// the parsed copies pile up. Our own name cache keeps every result, so
    /// dropping blazesym's after a burst of lookups costs only re-parsing.
    pub fn trim(&mut self) {
        if self.user_lookups >= 8 {
            self.blaze = Blaze::builder().enable_code_info(false).build();
            self.user_lookups = 0;
        }
    }

    fn resolve(
        &self,
        src: &Source<'_>,
        addrs: &[u64],
        unknown: impl Fn(u64) -> String,
    ) -> Vec<String> {
        // Stack entries past the first are return addresses; the call that made
        // them is one byte earlier and may belong to another (e.g. noreturn) function.
        let lookups: Vec<u64> = addrs.iter().map(|a| a.saturating_sub(1)).collect();
        let results = self
            .blaze
            .symbolize(src, Input::AbsAddr(&lookups))
            .unwrap_or_default();
        addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| match results.get(i) {
                Some(Symbolized::Sym(sym)) => {
                    format!("{}+{:#x}", sym.name, sym.offset + 1)
                }
                _ => unknown(addr),
            })
            .collect()
    }
}

/// One line of /proc/PID/maps that maps a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub path: String,
}

fn read_maps(tgid: u32) -> Vec<Mapping> {
    std::fs::read_to_string(format!("/proc/{tgid}/maps"))
        .map(|text| parse_maps(&text))
        .unwrap_or_default()
}

pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let range = parts.next()?;
            let _perms = parts.next()?;
            let offset = u64::from_str_radix(parts.next()?, 16).ok()?;
            let _dev = parts.next()?;
            let _inode = parts.next()?;
            let path = parts.collect::<Vec<_>>().join(" ");
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset,
                path,
            })
        })
        .collect()
}

pub fn module_offset(maps: &[Mapping], addr: u64) -> String {
    match maps.iter().find(|m| m.start <= addr && addr < m.end) {
        Some(m) if !m.path.is_empty() => {
            let name = Path::new(&m.path)
                .file_name()
                .map_or(m.path.clone(), |n| n.to_string_lossy().into_owned());
            format!("{name}+{:#x}", addr - m.start + m.offset)
        }
        _ => format!("[unknown] {addr:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a20000 r--p 00000000 fe:01 123 /usr/bin/kubelet
55d0c0a20000-55d0c0b00000 r-xp 00020000 fe:01 123 /usr/bin/kubelet
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn unknown_frames_are_module_offsets() {
        let maps = parse_maps(MAPS);
        assert_eq!(maps.len(), 4);
        assert_eq!(module_offset(&maps, 0x55d0c0a20010), "kubelet+0x20010");
        assert_eq!(
            module_offset(&maps, 0x7f0000000010),
            "[unknown] 0x7f0000000010"
        );
        assert_eq!(module_offset(&maps, 0x1), "[unknown] 0x1");
        assert_eq!(module_offset(&maps, 0x7ffc00000008), "[stack]+0x8");
    }
}
