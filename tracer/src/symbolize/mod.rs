//! Addresses -> names, with blazesym: kernel frames through kallsyms, user frames
//! through the process's own mappings (`/proc/PID/map_files`, so binaries inside
//! containers resolve). Results are cached per address. A frame we cannot name is
//! shown as `module+0xoffset` or a bare address, never as a guess.
//!
//! Go binaries are named from their own function table (`gosym`): stripped
//! ones have no ELF symbols for blazesym, and a nearby `.dynsym` entry would
//! be a wrong name.

pub mod gosym;
pub mod kallsyms;
pub mod tracing;

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use tracer_common::slab::MAX_USTACK;

use self::gosym::GoBinary;

use blazesym::{
    symbolize::{
        source::{Elf, Process, Source},
        Input, Symbolized, Symbolizer as Blaze,
    },
    Pid,
};

pub struct Symbolizer {
    /// User-space lookups; dropped every few lookups ([`Self::trim`]).
    blaze: Blaze,
    /// Kernel lookups: kept for the whole run, so /proc/kallsyms (~120,000
    /// lines, ~0.1 s to parse) is read once; loaded at the first lookup.
    kallsyms: Option<kallsyms::Kallsyms>,
    kernel: HashMap<u64, String>,
    /// One address can be several frames (Go's inlined calls).
    user: HashMap<(u32, u64), Vec<String>>,
    /// User lookups since blazesym's caches were last dropped.
    user_lookups: usize,
    go: GoCache,
    /// Mappings of processes taken when first seen, for those that exit
    /// before their stacks are named; oldest dropped first.
    images: HashMap<u32, ProcessImage>,
    image_order: std::collections::VecDeque<u32>,
    /// The file each user address lies in, per process (see [`Self::user_file`]).
    user_files: HashMap<(u32, u64), Option<Arc<MappedFile>>>,
    /// GNU build ids by file identity (one libc serves every process).
    build_ids: HashMap<FileKey, String>,
}

/// The file a user address lies in, as pprof's `Mapping` describes it:
/// `path` as /proc/PID/maps names it, mapped at `start..end` from file
/// offset `offset`, with the file's GNU build id (hex; empty when it has
/// none) so pprof can find and symbolize the same build elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedFile {
    pub path: String,
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub build_id: String,
}

/// Build ids remembered before the cache starts over.
const BUILD_IDS: usize = 1024;

/// What naming a process's user frames needs once it is gone: its file
/// mappings and an open handle on each mapped executable file (held open,
/// so the file stays readable after the process and its /proc entry vanish).
struct ProcessImage {
    maps: Vec<Mapping>,
    files: Vec<(u64, std::fs::File)>,
}

/// Process images kept at once: each holds a few open files.
const PROCESS_IMAGES: usize = 128;

/// The mapped file as the kernel sees it: a binary replaced on disk (a new
/// inode, or new contents) is a new key, so it never shares an old table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// Parsed Go tables per mapped file; `None` marks a file that is not Go (or
/// whose table we could not read), so it is inspected once.
#[derive(Default)]
struct GoCache {
    by_file: HashMap<FileKey, Option<Arc<GoBinary>>>,
    /// The same build in another container or path is parsed once.
    by_build_id: HashMap<Vec<u8>, Arc<GoBinary>>,
}

/// Files remembered before the cache starts over (each Go entry keeps its
/// file mapped; the names already given out stay in the name cache).
const GO_CACHE_FILES: usize = 256;

impl GoCache {
    fn binary(&mut self, path: &Path) -> Option<Arc<GoBinary>> {
        let meta = std::fs::metadata(path).ok()?;
        // Device mappings (/dev/zero, GPU memory) are not programs, and
        // mapping them again could have side effects.
        if !meta.is_file() {
            return None;
        }
        let key = FileKey::of(&meta);
        if let Some(hit) = self.by_file.get(&key) {
            return hit.clone();
        }
        if self.by_file.len() >= GO_CACHE_FILES {
            self.by_file.clear();
            self.by_build_id.clear();
        }
        let bin = match GoBinary::open(path) {
            Ok(Some(bin)) => {
                let shared = bin
                    .build_id
                    .as_ref()
                    .and_then(|id| self.by_build_id.get(id))
                    .cloned();
                Some(shared.unwrap_or_else(|| {
                    let bin = Arc::new(bin);
                    if let Some(id) = &bin.build_id {
                        self.by_build_id.insert(id.clone(), bin.clone());
                    }
                    bin
                }))
            }
            // Not Go, or a table we cannot read: blazesym's names (or
            // module+offset) serve.
            Ok(None) | Err(_) => None,
        };
        self.by_file.insert(key, bin.clone());
        bin
    }
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
            kallsyms: None,
            kernel: HashMap::new(),
            user: HashMap::new(),
            user_lookups: 0,
            go: GoCache::default(),
            images: HashMap::new(),
            image_order: std::collections::VecDeque::new(),
            user_files: HashMap::new(),
            build_ids: HashMap::new(),
        }
    }

    /// Remember what naming `tgid`'s frames needs, while it is alive: a process
    /// that allocates and exits within milliseconds is gone before a refresh,
    /// and its /proc/PID/maps with it. Cheap: one read and an open per
    /// executable mapping.
    /// Called again after an exec (a new comm): the old image is replaced, so
    /// no frame is ever named from the program the process ran before.
    pub fn snapshot(&mut self, tgid: u32) {
        self.images.remove(&tgid);
        self.image_order.retain(|&t| t != tgid);
        let maps = read_maps(tgid);
        if maps.is_empty() {
            return;
        }
        let files = maps
            .iter()
            .filter(|m| m.exec && m.path.starts_with('/'))
            .filter_map(|m| {
                let link = format!("/proc/{tgid}/map_files/{:x}-{:x}", m.start, m.end);
                Some((m.start, std::fs::File::open(link).ok()?))
            })
            .collect();
        while self.image_order.len() >= PROCESS_IMAGES {
            if let Some(old) = self.image_order.pop_front() {
                self.images.remove(&old);
            }
        }
        self.image_order.push_back(tgid);
        self.images.insert(tgid, ProcessImage { maps, files });
    }

    /// Take a new snapshot when `addrs` fall outside the executable mappings of
    /// the one we hold: it was taken before an exec finished mapping the new
    /// program (or before a library was loaded).
    pub fn snapshot_covering(&mut self, tgid: u32, addrs: &[u64]) {
        let covered = self.images.get(&tgid).is_some_and(|image| {
            addrs.iter().all(|&a| {
                image
                    .maps
                    .iter()
                    .any(|m| m.exec && m.start <= a && a < m.end)
            })
        });
        if !covered {
            self.snapshot(tgid);
        }
    }

    /// Frames from the process's snapshot (alive or gone): each address as a
    /// file offset in the mapped file it fell in, read through our own handle.
    /// None for an address it cannot name.
    fn frames_from_image(&mut self, tgid: u32, addrs: &[u64]) -> Vec<Option<Vec<String>>> {
        let Some(image) = self.images.get(&tgid) else {
            return vec![None; addrs.len()];
        };
        let mut jobs: Vec<(usize, PathBuf, u64, u64)> = Vec::new();
        for (i, &addr) in addrs.iter().enumerate() {
            let Some(m) = image
                .maps
                .iter()
                .find(|m| m.start <= addr && addr < m.end && m.exec)
            else {
                continue;
            };
            let Some((_, file)) = image.files.iter().find(|(start, _)| *start == m.start) else {
                continue;
            };
            let fd = std::os::fd::AsRawFd::as_raw_fd(file);
            let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
            jobs.push((i, path, addr - m.start + m.offset, addr));
        }
        let mut out: Vec<Option<Vec<String>>> = vec![None; addrs.len()];
        for (i, path, offset, addr) in jobs {
            match self.go_file_frames(&path, offset) {
                Some(Ok(frames)) => {
                    out[i] = Some(frames);
                    continue;
                }
                // Inside Go code but the table does not add up: no guess.
                Some(Err(())) => {
                    out[i] = self
                        .images
                        .get(&tgid)
                        .map(|image| vec![module_offset(&image.maps, addr)]);
                    continue;
                }
                None => {}
            }
            let src = Source::Elf(Elf {
                debug_syms: false,
                ..Elf::new(path)
            });
            // A return address's call is one byte earlier.
            let lookup = [offset.saturating_sub(1)];
            if let Ok(results) = self.blaze.symbolize(&src, Input::FileOffset(&lookup)) {
                if let Some(Symbolized::Sym(sym)) = results.first() {
                    out[i] = Some(vec![format!("{}+{:#x}", sym.name, sym.offset + 1)]);
                }
            }
        }
        out
    }

    /// The executable file mapping `addr` in `tgid`: from the snapshot taken
    /// when the process was first seen (so one that exited still answers),
    /// else from its maps now; None for anonymous memory (JIT code) or an
    /// address no mapping covers. Cached per address like the names.
    pub fn user_file(&mut self, tgid: u32, addr: u64) -> Option<Arc<MappedFile>> {
        if let Some(hit) = self.user_files.get(&(tgid, addr)) {
            return hit.clone();
        }
        let found = self.find_user_file(tgid, addr).map(Arc::new);
        self.user_files.insert((tgid, addr), found.clone());
        found
    }

    fn find_user_file(&mut self, tgid: u32, addr: u64) -> Option<MappedFile> {
        let covers = |m: &Mapping| m.exec && m.start <= addr && addr < m.end;
        let snapshot = self
            .images
            .get(&tgid)
            .and_then(|image| Some((image, image.maps.iter().find(|m| covers(m))?)));
        let (m, handle) = match snapshot {
            Some((image, m)) => {
                let handle =
                    image
                        .files
                        .iter()
                        .find(|(start, _)| *start == m.start)
                        .map(|(_, f)| {
                            let fd = std::os::fd::AsRawFd::as_raw_fd(f);
                            PathBuf::from(format!("/proc/self/fd/{fd}"))
                        });
                (m.clone(), handle)
            }
            None => {
                let m = read_maps(tgid).into_iter().find(|m| covers(m))?;
                let handle =
                    PathBuf::from(format!("/proc/{tgid}/map_files/{:x}-{:x}", m.start, m.end));
                (m, Some(handle))
            }
        };
        if !m.path.starts_with('/') {
            return None;
        }
        let build_id = handle.map(|h| self.build_id(&h)).unwrap_or_default();
        Some(MappedFile {
            path: m.path,
            start: m.start,
            end: m.end,
            offset: m.offset,
            build_id,
        })
    }

    fn build_id(&mut self, file: &Path) -> String {
        let Ok(meta) = std::fs::metadata(file) else {
            return String::new();
        };
        let key = FileKey::of(&meta);
        if let Some(id) = self.build_ids.get(&key) {
            return id.clone();
        }
        if self.build_ids.len() >= BUILD_IDS {
            self.build_ids.clear();
        }
        let id = gnu_build_id(file).unwrap_or_default();
        self.build_ids.insert(key, id.clone());
        id
    }

    /// Parse kallsyms now (a lookup of any kernel address loads it): done at
    /// the first report it stalls the event loop for ~100 ms, long enough
    /// for short-lived processes to exit before their mappings are taken.
    pub fn warm_kernel(&mut self) {
        let _ = self.kernel_frames(&[0xffff_ffff_8100_0000]);
        self.kernel.clear();
    }

    pub fn kernel_frames(&mut self, addrs: &[u64]) -> Vec<String> {
        let missing: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.kernel.contains_key(a))
            .collect();
        if !missing.is_empty() {
            let table = self.kallsyms.get_or_insert_with(kallsyms::Kallsyms::read);
            for addr in missing {
                // Stack entries past the first are return addresses; the call
                // that made them is one byte earlier and may belong to another
                // (e.g. noreturn) function.
                let name = match table.find(addr.saturating_sub(1)) {
                    Some((name, offset)) => format!("{name}+{:#x}", offset + 1),
                    None => format!("[kernel] {addr:#x}"),
                };
                self.kernel.insert(addr, name);
            }
        }
        addrs.iter().map(|a| self.kernel[a].clone()).collect()
    }

    /// Call while the process is alive; afterwards only cached frames resolve.
    /// One address may give several frames (inlined Go calls); a stack that
    /// filled the kernel's buffer without reaching a thread's first frame ends
    /// with a `[truncated …]` marker.
    pub fn user_frames(&mut self, tgid: u32, addrs: &[u64]) -> Vec<String> {
        let missing: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.user.contains_key(&(tgid, *a)))
            .collect();
        if !missing.is_empty() {
            self.user_lookups += 1;
            // The snapshot first: it names frames of a process that exited
            // between our reading its maps and blazesym reading them.
            let named = self.frames_from_image(tgid, &missing);
            for (&a, frames) in missing.iter().zip(named) {
                if let Some(frames) = frames {
                    self.user.insert((tgid, a), frames);
                }
            }
            let maps = read_maps(tgid);
            let missing: Vec<u64> = missing
                .into_iter()
                .filter(|a| !self.user.contains_key(&(tgid, *a)))
                .collect();
            let mut rest = Vec::new();
            for addr in missing {
                match self.go_frames(tgid, &maps, addr) {
                    Some(frames) => {
                        self.user.insert((tgid, addr), frames);
                    }
                    None => rest.push(addr),
                }
            }
            if !rest.is_empty() {
                // ELF symbols name every function; DWARF would add inlined frames
                // at the price of parsing debug info per binary, per process.
                let src = Source::Process(Process {
                    debug_syms: false,
                    perf_map: false,
                    ..Process::new(Pid::from(tgid))
                });
                let names = resolve(&self.blaze, &src, &rest, |addr| module_offset(&maps, addr));
                self.user.extend(
                    rest.into_iter()
                        .map(|a| (tgid, a))
                        .zip(names.into_iter().map(|n| vec![n])),
                );
            }
        }
        let mut out: Vec<String> = addrs
            .iter()
            .flat_map(|a| {
                self.user
                    .get(&(tgid, *a))
                    .cloned()
                    .unwrap_or_else(|| vec![format!("[unknown] {a:#x}")])
            })
            .collect();
        if addrs.len() >= MAX_USTACK && !out.last().is_some_and(|f| is_stack_root(f)) {
            out.push(format!("[truncated at {MAX_USTACK} frames]"));
        }
        out
    }

    /// Frames of `addr` from the Go table of the binary mapped there, or None
    /// when that is not a Go binary or the address is outside its Go code
    /// (cgo's C code: blazesym names that).
    fn go_frames(&mut self, tgid: u32, maps: &[Mapping], addr: u64) -> Option<Vec<String>> {
        let m = maps
            .iter()
            .find(|m| m.start <= addr && addr < m.end && m.path.starts_with('/'))?;
        // map_files pins the inode the process mapped: a binary replaced on
        // disk since the process started is still read as the one it runs.
        let path = PathBuf::from(format!("/proc/{tgid}/map_files/{:x}-{:x}", m.start, m.end));
        match self.go_file_frames(&path, addr - m.start + m.offset)? {
            Ok(frames) => Some(frames),
            // Inside Go code but the table does not add up: no guess.
            Err(()) => Some(vec![module_offset(maps, addr)]),
        }
    }

    /// Frames of the return address at `offset` in the file at `path` from
    /// its Go table; None when it is not Go (or outside its Go code), an error
    /// when the table does not add up there.
    fn go_file_frames(&mut self, path: &Path, offset: u64) -> Option<Result<Vec<String>, ()>> {
        let bin = self.go.binary(path)?;
        let vaddr = bin.vaddr_of_offset(offset)?;
        // Stack entries are return addresses (the first one is the
        // instruction after `syscall`): the call is one byte earlier.
        match bin.frames(vaddr.saturating_sub(1)) {
            Ok(Some(frames)) => Some(Ok(frames
                .into_iter()
                .map(|mut f| {
                    f.offset = f.offset.map(|o| o + 1);
                    gosym::format_frame(&f)
                })
                .collect())),
            Ok(None) => None,
            Err(_) => Some(Err(())),
        }
    }

    /// blazesym caches every binary it parsed, keyed by path; through
    /// /proc/PID/map_files each process is a new path, so with many processes
    /// the parsed copies pile up. Our own name cache keeps every result, so
    /// dropping blazesym's after a burst of lookups costs only re-parsing.
    /// Drop everything kept for processes that are gone and forgotten.
    pub fn forget(&mut self, tgids: &[u32]) {
        if tgids.is_empty() {
            return;
        }
        let gone: std::collections::HashSet<u32> = tgids.iter().copied().collect();
        self.user.retain(|(t, _), _| !gone.contains(t));
        self.user_files.retain(|(t, _), _| !gone.contains(t));
        for t in tgids {
            self.images.remove(t);
        }
        self.image_order.retain(|t| !gone.contains(t));
    }

    pub fn trim(&mut self) {
        if self.user_lookups >= 8 {
            self.blaze = Blaze::builder().enable_code_info(false).build();
            self.user_lookups = 0;
            // A big binary's symbol table (a compiler's, a Go daemon's) can be
            // tens of MB: give those pages back now, not at exit.
            crate::kernel::own_memory::return_freed_memory();
        }
    }
}

/// `addrs` named by `blaze` from `src`, `unknown` where it cannot.
fn resolve(
    blaze: &Blaze,
    src: &Source<'_>,
    addrs: &[u64],
    unknown: impl Fn(u64) -> String,
) -> Vec<String> {
    // Stack entries past the first are return addresses; the call that made
    // them is one byte earlier and may belong to another (e.g. noreturn) function.
    let lookups: Vec<u64> = addrs.iter().map(|a| a.saturating_sub(1)).collect();
    let results = blaze
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

/// The `NT_GNU_BUILD_ID` note of an ELF file, hex: what pprof (and
/// debuginfod) look a build up by. Go's own build id is a different string
/// that pprof does not use.
fn gnu_build_id(path: &Path) -> Option<String> {
    use object::Object;
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: read-only mapping of a file we only read; a concurrent
    // truncation could fault, as for every ELF reader that maps files.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let elf = object::File::parse(&*map).ok()?;
    let id = elf.build_id().ok().flatten()?;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// One line of /proc/PID/maps that maps a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    /// Mapped executable (`x` in the permissions).
    pub exec: bool,
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
            let perms = parts.next()?;
            let offset = u64::from_str_radix(parts.next()?, 16).ok()?;
            let _dev = parts.next()?;
            let _inode = parts.next()?;
            let path = parts.collect::<Vec<_>>().join(" ");
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset,
                exec: perms.contains('x'),
                path,
            })
        })
        .collect()
}

/// Frames where a thread's stack begins: a stack ending elsewhere at the
/// frame limit was cut.
fn is_stack_root(frame: &str) -> bool {
    const ROOTS: [&str; 9] = [
        "runtime.goexit",
        "runtime.mstart",
        "runtime.rt0_go",
        "_start",
        "__libc_start_main",
        "__libc_start_call_main",
        "start_thread",
        "clone",
        "__clone",
    ];
    ROOTS.iter().any(|r| {
        frame
            .strip_prefix(r)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ' ']))
    })
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

    #[test]
    fn stack_roots() {
        assert!(is_stack_root("runtime.goexit+0x1 asm_amd64.s:1594"));
        assert!(is_stack_root("_start+0x25"));
        assert!(!is_stack_root("runtime.goexit1+0x4"));
        assert!(!is_stack_root("main.main+0x4"));
    }

    /// Wait for the program's READY line: spawn returns as soon as exec has
    /// replaced the address space, before the binary's segments are mapped.
    fn wait_ready(child: &mut std::process::Child) {
        use std::io::BufRead;
        let out = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("reading READY");
        assert!(line.starts_with("READY"), "{line:?}");
    }

    /// A position-independent Go program, loaded at a random base, resolves
    /// through its mapping's file offset.
    #[test]
    fn pie_go_binary_resolves_at_its_load_address() {
        use std::process::{Command, Stdio};
        // Its own file: other tests rebuild theirs while this one runs it.
        let exe = gosym::real::build_as("unit-pie-run", &["-buildmode=pie", "-ldflags", "-s -w"]);
        let bin = GoBinary::open(&exe).expect("parse").expect("Go");
        let (entry, _) = bin
            .functions()
            .expect("functions")
            .into_iter()
            .find(|(_, n)| n == "main.retryConnect")
            .expect("main.retryConnect in the table");
        let off = bin.offset_of_vaddr(entry + 0x10).expect("mapped");
        let mut child = Command::new(&exe)
            .arg("0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        wait_ready(&mut child);
        let canonical = exe.canonicalize().ok();
        let maps = read_maps(child.id());
        let m = maps
            .iter()
            .find(|m| {
                Some(Path::new(&m.path)) == canonical.as_deref()
                    && m.offset <= off
                    && off < m.offset + (m.end - m.start)
            })
            .cloned();
        let frames = m.map(|m| {
            let mut sym = Symbolizer::new();
            sym.user_frames(child.id(), &[m.start + off - m.offset])
        });
        let _ = child.kill();
        let _ = child.wait();
        let frames = frames.unwrap_or_else(|| {
            panic!("no mapping of {canonical:?} at offset {off:#x} in {maps:#?}")
        });
        assert!(
            frames.len() == 1 && frames[0].starts_with("main.retryConnect+0x10 main.go:"),
            "{frames:?}"
        );
    }

    /// A running Go program whose binary is replaced on disk keeps its own
    /// names: the table is read through /proc/PID/map_files, which is the
    /// mapped inode, not the path's new file.
    #[test]
    fn replaced_go_binary_keeps_its_own_names() {
        use std::process::{Command, Stdio};
        let built = gosym::real::build(true);
        let dir = built.with_file_name(format!("replaced-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let exe = dir.join("leakkeys");
        std::fs::copy(&built, &exe).expect("copy");
        let bin = GoBinary::open(&exe).expect("parse").expect("Go");
        let (entry, _) = bin
            .functions()
            .expect("functions")
            .into_iter()
            .find(|(_, n)| n == "main.leakKeys")
            .expect("main.leakKeys in the table");
        // With 0 keys it only prints READY and waits on stdin.
        let mut child = Command::new(&exe)
            .arg("0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        wait_ready(&mut child);
        // The old file is mapped now. Replace the file at the path with
        // another program entirely.
        let other = dir.join("other");
        std::fs::copy("/bin/true", &other).expect("copy /bin/true");
        std::fs::rename(&other, &exe).expect("replace");
        let mut sym = Symbolizer::new();
        let frames = sym.user_frames(child.id(), &[entry + 0x10]);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert!(
            frames[0].starts_with("main.leakKeys+0x10 main.go:"),
            "{frames:?}"
        );
    }
}
