//! Go's own function table, `.gopclntab`: function names, files and lines (and
//! inlined calls) for Go binaries, stripped ones included. `go build -ldflags
//! '-s -w'` drops `.symtab` and DWARF, but the runtime needs pclntab for stack
//! traces and GC, so every Go binary carries it.
//!
//! Layouts (chosen by the table's magic; field positions follow the runtime's
//! `pcHeader`, `_func`, `inlinedCall` and `moduledata` of each version):
//! - `0xfffffffa`: Go 1.16-1.17: absolute entry PCs in the function table,
//!   absolute funcdata pointers.
//! - `0xfffffff0`: Go 1.18-1.19: 32-bit entry offsets from `textStart`,
//!   funcdata as offsets from `moduledata.gofunc`.
//! - `0xfffffff1`: Go 1.20+: as 1.18, plus `_func.startLine` and a smaller
//!   `inlinedCall`.
//!
//! Every read is bounds-checked: a malformed table gives an error, never a
//! panic. A name is returned only when the function table's entry and the
//! `_func` record agree on the function's entry PC, so a shifted or corrupted
//! table does not hand out a neighbour's name.

use std::{fs::File, ops::Range, path::Path};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use object::{Object, ObjectSection, ObjectSegment};

const MAGIC_116: u32 = 0xffff_fffa;
const MAGIC_118: u32 = 0xffff_fff0;
const MAGIC_120: u32 = 0xffff_fff1;
/// Go 1.2-1.15; a different layout we do not parse.
const MAGIC_12: u32 = 0xffff_fffb;

const PCDATA_INL_TREE_INDEX: u32 = 2;
const FUNCDATA_INL_TREE: u32 = 3;
/// Deeper inline chains do not occur in practice (the compiler's budget stops
/// far earlier); a table claiming more is corrupt or cyclic.
const MAX_INLINE_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Go116,
    Go118,
    Go120,
}

/// One source-level frame of a PC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoFrame {
    pub function: String,
    /// PC minus the function's entry; for the physical (outermost) frame only:
    /// an inlined frame has no entry of its own.
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<i32>,
    pub inlined: bool,
}

/// The validated header of one pclntab; reads take the table bytes.
#[derive(Debug, Clone)]
pub struct Pclntab {
    pub version: Version,
    ptr_size: usize,
    quantum: u64,
    nfunc: usize,
    /// 1.18+: base of the 32-bit entry offsets.
    text_start: u64,
    funcnametab: Range<usize>,
    cutab: Range<usize>,
    filetab: Range<usize>,
    pctab: Range<usize>,
    /// Start of `pclntable`: the function table, then the `_func` records.
    pcln: usize,
}

/// Bounds-checked little-endian reads.
fn bytes(tab: &[u8], off: usize, len: usize) -> Result<&[u8]> {
    off.checked_add(len)
        .and_then(|end| tab.get(off..end))
        .with_context(|| format!("read of {len} bytes at {off:#x} past the table's end"))
}

fn u32_at(tab: &[u8], off: usize) -> Result<u32> {
    let b = bytes(tab, off, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn i32_at(tab: &[u8], off: usize) -> Result<i32> {
    Ok(u32_at(tab, off)? as i32)
}

fn word_at(tab: &[u8], off: usize, ptr_size: usize) -> Result<u64> {
    if ptr_size == 8 {
        let b = bytes(tab, off, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    } else {
        Ok(u64::from(u32_at(tab, off)?))
    }
}

fn usize_of(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).with_context(|| format!("{what} {v:#x} does not fit"))
}

/// NUL-terminated UTF-8 string at `off` of `region`; must start a string (the
/// byte before is NUL) so an offset into the middle of a name is rejected.
fn cstr<'a>(tab: &'a [u8], region: &Range<usize>, off: usize) -> Result<&'a str> {
    let r = tab
        .get(region.clone())
        .context("string table outside the pclntab")?;
    ensure!(off < r.len(), "string offset {off:#x} outside its table");
    ensure!(
        off == 0 || r[off - 1] == 0,
        "string offset {off:#x} is not the start of a string"
    );
    let rest = &r[off..];
    let len = rest
        .iter()
        .position(|&b| b == 0)
        .context("unterminated string")?;
    ensure!(len > 0, "empty name at {off:#x}");
    std::str::from_utf8(&rest[..len]).context("string is not UTF-8")
}

fn varint(tab: &[u8], pos: &mut usize) -> Result<u32> {
    let mut v: u32 = 0;
    let mut shift = 0;
    loop {
        let b = *tab.get(*pos).context("varint past the table's end")?;
        *pos += 1;
        ensure!(shift < 35, "varint longer than 5 bytes");
        v |= u32::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
    }
}

/// A function record: where its `_func` is and the fields we read.
#[derive(Debug, Clone, Copy)]
struct Func {
    entry: u64,
    nameoff: u32,
    pcfile: u32,
    pcln: u32,
    npcdata: u32,
    cu_offset: u32,
    nfuncdata: u8,
    /// Offset of the pcdata array.
    pcdata_at: usize,
}

impl Pclntab {
    /// Validate the header and the function table of `tab`.
    pub fn parse(tab: &[u8]) -> Result<Pclntab> {
        let magic = u32_at(tab, 0).context("pclntab header")?;
        let version = match magic {
            MAGIC_116 => Version::Go116,
            MAGIC_118 => Version::Go118,
            MAGIC_120 => Version::Go120,
            MAGIC_12 => bail!("Go 1.2-1.15 pclntab (magic {magic:#x}) is not supported"),
            _ => bail!("not a Go pclntab (magic {magic:#x})"),
        };
        let head = bytes(tab, 4, 4)?;
        ensure!(
            head[0] == 0 && head[1] == 0,
            "pclntab header padding not zero"
        );
        let quantum = u64::from(head[2]);
        ensure!(
            matches!(quantum, 1 | 2 | 4),
            "pclntab PC quantum {quantum} invalid"
        );
        let ptr_size = usize::from(head[3]);
        ensure!(
            ptr_size == 4 || ptr_size == 8,
            "pclntab pointer size {ptr_size} invalid"
        );
        let word = |i: usize| word_at(tab, 8 + i * ptr_size, ptr_size);
        let nfunc = usize_of(word(0)?, "function count")?;
        let (text_start, rest) = match version {
            Version::Go116 => (0, 2),
            Version::Go118 | Version::Go120 => (word(2)?, 3),
        };
        let off = |i: usize| -> Result<usize> {
            let v = usize_of(word(rest + i)?, "pclntab offset")?;
            ensure!(v <= tab.len(), "pclntab offset {v:#x} past its end");
            Ok(v)
        };
        let (funcname, cu, file, pc, pcln) = (off(0)?, off(1)?, off(2)?, off(3)?, off(4)?);
        // The runtime lays the tables out in this order; using the next
        // table's start as each one's end bounds every string read.
        ensure!(
            funcname <= cu && cu <= file && file <= pc && pc <= pcln,
            "pclntab sub-tables out of order"
        );
        ensure!(nfunc > 0, "pclntab lists no functions");
        let t = Pclntab {
            version,
            ptr_size,
            quantum,
            nfunc,
            text_start,
            funcnametab: funcname..cu,
            cutab: cu..file,
            filetab: file..pc,
            pctab: pc..pcln,
            pcln,
        };
        // The function table (nfunc + 1 entries, the last one the end PC) must
        // fit and be sorted, or the binary search would return a wrong function.
        let mut prev = 0;
        for i in 0..=nfunc {
            let e = t.ftab_entry(tab, i)?;
            ensure!(i == 0 || e >= prev, "function table not sorted at {i}");
            prev = e;
        }
        Ok(t)
    }

    fn ftab_stride(&self) -> usize {
        match self.version {
            Version::Go116 => 2 * self.ptr_size,
            _ => 8,
        }
    }

    /// (entry PC, offset of `_func` from pclntable) of function table slot `i`.
    fn ftab(&self, tab: &[u8], i: usize) -> Result<(u64, usize)> {
        let at = i
            .checked_mul(self.ftab_stride())
            .and_then(|o| o.checked_add(self.pcln))
            .context("function table index overflows")?;
        match self.version {
            Version::Go116 => Ok((
                word_at(tab, at, self.ptr_size)?,
                usize_of(
                    word_at(tab, at + self.ptr_size, self.ptr_size)?,
                    "func offset",
                )?,
            )),
            _ => Ok((
                self.text_start
                    .checked_add(u64::from(u32_at(tab, at)?))
                    .context("entry PC overflows")?,
                usize_of(u64::from(u32_at(tab, at + 4)?), "func offset")?,
            )),
        }
    }

    fn ftab_entry(&self, tab: &[u8], i: usize) -> Result<u64> {
        Ok(self.ftab(tab, i)?.0)
    }

    /// Lowest and one-past-highest PC the table covers.
    pub fn pc_range(&self, tab: &[u8]) -> Result<Range<u64>> {
        Ok(self.ftab_entry(tab, 0)?..self.ftab_entry(tab, self.nfunc)?)
    }

    fn func(&self, tab: &[u8], pc: u64) -> Result<Option<Func>> {
        let range = self.pc_range(tab)?;
        if !range.contains(&pc) {
            return Ok(None);
        }
        // Last slot whose entry <= pc; slot nfunc is the end marker.
        let (mut lo, mut hi) = (0, self.nfunc);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.ftab_entry(tab, mid)? <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (entry, funcoff) = self.ftab(tab, lo)?;
        let at = self
            .pcln
            .checked_add(funcoff)
            .context("func offset overflows")?;
        let p = self.ptr_size;
        let (rec_entry, fields) = match self.version {
            Version::Go116 => (word_at(tab, at, p)?, at + p),
            _ => (
                self.text_start
                    .checked_add(u64::from(u32_at(tab, at)?))
                    .context("entry PC overflows")?,
                at + 4,
            ),
        };
        ensure!(
            rec_entry == entry,
            "function record at {at:#x} says entry {rec_entry:#x}, table says {entry:#x}"
        );
        // Fields after the entry: nameoff, args, deferreturn, pcsp, pcfile,
        // pcln, npcdata, cuOffset, [startLine,] funcID, flag, pad, nfuncdata.
        let field = |i: usize| u32_at(tab, fields + 4 * i);
        let tail = match self.version {
            Version::Go120 => fields + 4 * 9,
            _ => fields + 4 * 8,
        };
        let nfuncdata = bytes(tab, tail, 4)?[3];
        Ok(Some(Func {
            entry,
            nameoff: field(0)?,
            pcfile: field(4)?,
            pcln: field(5)?,
            npcdata: field(6)?,
            cu_offset: field(7)?,
            nfuncdata,
            pcdata_at: tail + 4,
        }))
    }

    fn name(&self, tab: &[u8], nameoff: u32) -> Result<String> {
        Ok(cstr(
            tab,
            &self.funcnametab,
            usize_of(u64::from(nameoff), "name offset")?,
        )?
        .to_string())
    }

    /// The value a pc-value table (`off` into pctab) gives at `pc`, or None
    /// when the function has no such table.
    fn pcvalue(&self, tab: &[u8], f: &Func, off: u32, pc: u64) -> Result<Option<i32>> {
        if off == 0 {
            return Ok(None);
        }
        let region = tab
            .get(self.pctab.clone())
            .context("pctab outside the table")?;
        let mut pos = usize_of(u64::from(off), "pc-value offset")?;
        ensure!(pos < region.len(), "pc-value offset {off:#x} outside pctab");
        let mut val: i32 = -1;
        let mut cur = f.entry;
        let mut first = true;
        // Each step consumes at least two bytes, so the loop is bounded by the
        // table's length even when its terminator was lost.
        loop {
            let start = pos;
            let uv = *region.get(pos).context("pc-value table runs off pctab")?;
            if uv == 0 && !first {
                bail!("pc {pc:#x} past its function's pc-value table");
            }
            let uvdelta = varint(region, &mut pos)?;
            let delta = if uvdelta & 1 != 0 {
                !((uvdelta >> 1) as i32)
            } else {
                (uvdelta >> 1) as i32
            };
            val = val.wrapping_add(delta);
            let pcdelta = varint(region, &mut pos)?;
            ensure!(pos > start, "pc-value table made no progress");
            cur = cur
                .checked_add(u64::from(pcdelta) * self.quantum)
                .context("pc-value table overflows")?;
            first = false;
            if pc < cur {
                return Ok(Some(val));
            }
        }
    }

    fn file(&self, tab: &[u8], f: &Func, fileno: i32) -> Result<String> {
        ensure!(fileno >= 0, "negative file index");
        let idx = u64::from(f.cu_offset) + fileno as u64;
        let at = self
            .cutab
            .start
            .checked_add(usize_of(idx * 4, "cutab index")?)
            .context("cutab index overflows")?;
        ensure!(at + 4 <= self.cutab.end, "file index {idx} outside cutab");
        let off = u32_at(tab, at)?;
        ensure!(off != u32::MAX, "file index {idx} has no file");
        Ok(cstr(tab, &self.filetab, off as usize)?.to_string())
    }

    fn pcdata_off(&self, tab: &[u8], f: &Func, table: u32) -> Result<Option<u32>> {
        if table >= f.npcdata {
            return Ok(None);
        }
        Ok(Some(u32_at(tab, f.pcdata_at + 4 * table as usize)?))
    }

    /// The funcdata slot `i`: an absolute address (1.16) or an offset from
    /// `moduledata.gofunc` (1.18+).
    fn funcdata(&self, tab: &[u8], f: &Func, i: u32) -> Result<Option<FuncData>> {
        if i >= u32::from(f.nfuncdata) {
            return Ok(None);
        }
        let after_pcdata = f.pcdata_at + 4 * f.npcdata as usize;
        match self.version {
            Version::Go116 => {
                // Pointer-aligned in memory; pclntab itself is pointer-aligned,
                // so aligning the table offset aligns the address.
                let mut at = after_pcdata;
                if self.ptr_size == 8 && !at.is_multiple_of(8) {
                    at += 4;
                }
                let p = word_at(tab, at + self.ptr_size * i as usize, self.ptr_size)?;
                Ok((p != 0).then_some(FuncData::Absolute(p)))
            }
            _ => {
                let off = u32_at(tab, after_pcdata + 4 * i as usize)?;
                Ok((off != u32::MAX).then_some(FuncData::GoFuncOffset(off)))
            }
        }
    }

    /// Frames of `pc`, innermost (inlined callee) first, physical function
    /// last. `pc` must already point into the instruction of interest (for a
    /// return address, pass it minus one). `mem` reads the binary's memory
    /// image by virtual address (for the inline tree); `gofunc` is
    /// `moduledata.gofunc` when known. Without either, the physical function
    /// alone is returned.
    pub fn frames(
        &self,
        tab: &[u8],
        pc: u64,
        mem: &dyn Fn(u64, usize) -> Option<Vec<u8>>,
        gofunc: Option<u64>,
    ) -> Result<Option<Vec<GoFrame>>> {
        let Some(f) = self.func(tab, pc)? else {
            return Ok(None);
        };
        let outer_name = self.name(tab, f.nameoff)?;
        let file_line = |at: u64| -> (Option<String>, Option<i32>) {
            let file = self
                .pcvalue(tab, &f, f.pcfile, at)
                .ok()
                .flatten()
                .and_then(|n| self.file(tab, &f, n).ok());
            let line = self.pcvalue(tab, &f, f.pcln, at).ok().flatten();
            (file, line)
        };
        let mut frames = Vec::new();
        let mut at = pc;
        // Inlined frames are a bonus: a table we cannot follow leaves the
        // physical function, which is still right.
        if let Ok(chain) = self.inline_chain(tab, &f, pc, mem, gofunc) {
            for (name, parent_pc) in chain {
                let (file, line) = file_line(at);
                frames.push(GoFrame {
                    function: name,
                    offset: None,
                    file,
                    line,
                    inlined: true,
                });
                at = parent_pc;
            }
        }
        let (file, line) = file_line(at);
        frames.push(GoFrame {
            function: outer_name,
            offset: Some(pc - f.entry),
            file,
            line,
            inlined: false,
        });
        Ok(Some(frames))
    }

    /// (inlined function name, PC of its call site in the parent) from the
    /// innermost inlined call outwards.
    fn inline_chain(
        &self,
        tab: &[u8],
        f: &Func,
        pc: u64,
        mem: &dyn Fn(u64, usize) -> Option<Vec<u8>>,
        gofunc: Option<u64>,
    ) -> Result<Vec<(String, u64)>> {
        let Some(ixtab) = self.pcdata_off(tab, f, PCDATA_INL_TREE_INDEX)? else {
            return Ok(Vec::new());
        };
        let Some(tree) = self.funcdata(tab, f, FUNCDATA_INL_TREE)? else {
            return Ok(Vec::new());
        };
        let tree = match tree {
            FuncData::Absolute(a) => a,
            FuncData::GoFuncOffset(off) => gofunc
                .context("inline tree needs moduledata.gofunc")?
                .checked_add(u64::from(off))
                .context("inline tree address overflows")?,
        };
        let size = match self.version {
            Version::Go120 => 16,
            _ => 20,
        };
        let mut out = Vec::new();
        let mut at = pc;
        loop {
            let ix = match self.pcvalue(tab, f, ixtab, at)? {
                Some(ix) if ix >= 0 => ix as u64,
                _ => return Ok(out),
            };
            ensure!(out.len() < MAX_INLINE_DEPTH, "inline chain too deep");
            let addr = tree
                .checked_add(ix * size)
                .context("inline tree index overflows")?;
            let rec = mem(addr, size as usize).context("inline tree outside the binary")?;
            let (nameoff, parent_pc) = match self.version {
                // funcID, pad[3], nameOff, parentPc, startLine
                Version::Go120 => (i32_at(&rec, 4)?, i32_at(&rec, 8)?),
                // parent, funcID, pad, file, line, func_, parentPc
                _ => (i32_at(&rec, 12)?, i32_at(&rec, 16)?),
            };
            ensure!(nameoff >= 0 && parent_pc >= 0, "negative inline tree field");
            let name = self.name(tab, nameoff as u32)?;
            let parent = f.entry + parent_pc as u64;
            out.push((name, parent));
            at = parent;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum FuncData {
    Absolute(u64),
    GoFuncOffset(u32),
}

/// One loadable part of the file: `vaddr..vaddr+size` is at file `offset`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    size: u64,
    offset: u64,
}

/// A Go binary opened through a path that pins its inode (for a running
/// process, `/proc/PID/map_files/…`), with its pclntab located and validated.
pub struct GoBinary {
    map: Mmap,
    tab: Range<usize>,
    table: Pclntab,
    segments: Vec<Segment>,
    gofunc: Option<u64>,
    pub build_id: Option<Vec<u8>>,
}

/// Build id of an ELF file: Go's own note, else the GNU one.
pub fn build_id(data: &[u8]) -> Option<Vec<u8>> {
    let elf = object::File::parse(data).ok()?;
    if let Some(id) = elf
        .section_by_name(".note.go.buildid")
        .and_then(|s| s.data().ok())
        .and_then(note_desc)
    {
        return Some(id.to_vec());
    }
    elf.build_id().ok().flatten().map(<[u8]>::to_vec)
}

/// The descriptor of the first note in `data` (an ELF note section).
fn note_desc(data: &[u8]) -> Option<&[u8]> {
    let namesz = u32_at(data, 0).ok()? as usize;
    let descsz = u32_at(data, 4).ok()? as usize;
    let start = 12usize.checked_add(namesz.checked_add(3)? & !3)?;
    data.get(start..start.checked_add(descsz)?)
}

/// Whether the ELF image is a Go program (cheap: section names only).
pub fn is_go(elf: &object::File<'_>) -> bool {
    [".gopclntab", ".go.buildinfo", ".note.go.buildid"]
        .iter()
        .any(|n| elf.section_by_name(n).is_some())
}

impl GoBinary {
    /// Map `path` and find its pclntab. `Ok(None)`: not a Go binary.
    pub fn open(path: &Path) -> Result<Option<GoBinary>> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the mapping is read-only and private. Through map_files the
        // file is the running program's own text, which the kernel keeps from
        // being written (ETXTBSY), so the bytes do not change under us.
        let map =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Self::from_map(map)
    }

    fn from_map(map: Mmap) -> Result<Option<GoBinary>> {
        let data: &[u8] = &map;
        if data.get(..4) != Some(b"\x7fELF") {
            return Ok(None);
        }
        let elf = object::File::parse(data).context("parsing ELF")?;
        let segments: Vec<Segment> = elf
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                Segment {
                    vaddr: s.address(),
                    size,
                    offset,
                }
            })
            .collect();
        // PIE builds put the table among the relocated read-only data.
        let section = elf
            .section_by_name(".gopclntab")
            .or_else(|| elf.section_by_name(".data.rel.ro.gopclntab"));
        let found = match section {
            Some(s) => {
                let (off, size) = s.file_range().context(".gopclntab has no file data")?;
                Some((
                    s.address(),
                    usize_of(off, "offset")?..usize_of(off + size, "offset")?,
                ))
            }
            None if is_go(&elf) || find_magic(&elf, data).is_some() => find_magic(&elf, data),
            None => None,
        };
        let Some((tab_vaddr, tab)) = found else {
            if is_go(&elf) {
                bail!("Go binary without a pclntab we can find");
            }
            return Ok(None);
        };
        let bytes = data.get(tab.clone()).context("pclntab outside the file")?;
        let mut table = Pclntab::parse(bytes).context("parsing .gopclntab")?;
        // Internally linked PIE binaries leave textStart to a relocation (0 in
        // the file); the runtime's text is then where .text starts.
        if table.version != Version::Go116 && table.text_start == 0 {
            if let Some(text) = elf.section_by_name(".text") {
                table.text_start = text.address();
                Pclntab::parse(bytes)?; // still well-formed
            }
        }
        let gofunc = match table.version {
            Version::Go116 => None,
            v => find_gofunc(&elf, data, tab_vaddr, &table, v),
        };
        let build_id = build_id(data);
        Ok(Some(GoBinary {
            tab,
            table,
            segments,
            gofunc,
            build_id,
            map,
        }))
    }

    /// Virtual address (as linked) of file offset `off`, if a segment maps it.
    pub fn vaddr_of_offset(&self, off: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.offset <= off && off < s.offset + s.size)
            .map(|s| off - s.offset + s.vaddr)
    }

    fn read_vaddr(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let s = self
            .segments
            .iter()
            .find(|s| s.vaddr <= addr && addr + len as u64 <= s.vaddr + s.size)?;
        let off = usize::try_from(addr - s.vaddr + s.offset).ok()?;
        self.map.get(off..off.checked_add(len)?).map(<[u8]>::to_vec)
    }

    /// Frames at linked virtual address `pc` (see [`Pclntab::frames`]).
    pub fn frames(&self, pc: u64) -> Result<Option<Vec<GoFrame>>> {
        let tab = self
            .map
            .get(self.tab.clone())
            .context("pclntab outside the file")?;
        self.table
            .frames(tab, pc, &|a, n| self.read_vaddr(a, n), self.gofunc)
    }

    /// Every (entry PC, name) of the table: for tests and checks.
    #[cfg(test)]
    pub fn functions(&self) -> Result<Vec<(u64, String)>> {
        self.table.functions(self.table_bytes())
    }

    /// File offset of linked virtual address `vaddr`: for tests.
    #[cfg(test)]
    pub fn offset_of_vaddr(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.vaddr <= vaddr && vaddr < s.vaddr + s.size)
            .map(|s| vaddr - s.vaddr + s.offset)
    }

    #[cfg(test)]
    fn table_bytes(&self) -> &[u8] {
        &self.map[self.tab.clone()]
    }
}

#[cfg(test)]
impl Pclntab {
    pub fn functions(&self, tab: &[u8]) -> Result<Vec<(u64, String)>> {
        (0..self.nfunc)
            .map(|i| {
                let entry = self.ftab_entry(tab, i)?;
                let f = self.func(tab, entry)?.context("entry outside the table")?;
                Ok((f.entry, self.name(tab, f.nameoff)?))
            })
            .collect()
    }
}

/// Find a pclntab by its header where the section header is gone (some
/// linkers fold it into `.data.rel.ro` or `.rodata`): (vaddr, file range).
fn find_magic(elf: &object::File<'_>, data: &[u8]) -> Option<(u64, Range<usize>)> {
    for s in elf.sections() {
        let name = s.name().unwrap_or("");
        if ![".data.rel.ro", ".rodata", ".noptrdata", ".data"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let Some((off, size)) = s.file_range() else {
            continue;
        };
        let (Ok(off), Ok(size)) = (usize::try_from(off), usize::try_from(size)) else {
            continue;
        };
        let Some(sec) = data.get(off..off.saturating_add(size)) else {
            continue;
        };
        for at in (0..sec.len().saturating_sub(8)).step_by(8) {
            let m = u32::from_le_bytes([sec[at], sec[at + 1], sec[at + 2], sec[at + 3]]);
            if matches!(m, MAGIC_116 | MAGIC_118 | MAGIC_120)
                && sec[at + 4] == 0
                && sec[at + 5] == 0
                && Pclntab::parse(&sec[at..]).is_ok()
            {
                return Some((s.address() + at as u64, off + at..off + size));
            }
        }
    }
    None
}

/// `moduledata.gofunc` (base of 1.18+ funcdata offsets). moduledata starts
/// with a pointer to the pclntab header and the funcnametab slice; it is found
/// by those two words and checked by its `text` field. Where the pointers are
/// not in the file (left to relocations only), inlined frames are left out.
fn find_gofunc(
    elf: &object::File<'_>,
    data: &[u8],
    tab_vaddr: u64,
    table: &Pclntab,
    version: Version,
) -> Option<u64> {
    let p = table.ptr_size;
    let funcnametab = tab_vaddr + table.funcnametab.start as u64;
    // Word indexes of `text` and `gofunc` (1.20 added covctrs/ecovctrs).
    let (text_ix, gofunc_ix) = match version {
        Version::Go120 => (22, 40),
        _ => (22, 38),
    };
    for s in elf.sections() {
        if !matches!(s.name().unwrap_or(""), ".noptrdata" | ".data") {
            continue;
        }
        let (off, size) = s.file_range()?;
        let sec = data.get(usize::try_from(off).ok()?..usize::try_from(off + size).ok()?)?;
        let mut at = 0;
        while at + (gofunc_ix + 1) * p <= sec.len() {
            let w = |i: usize| word_at(sec, at + i * p, p).ok();
            if w(0) == Some(tab_vaddr)
                && w(1) == Some(funcnametab)
                && w(text_ix) == Some(table.text_start)
            {
                let gofunc = w(gofunc_ix)?;
                let inside = elf
                    .sections()
                    .any(|s| s.address() <= gofunc && gofunc < s.address() + s.size());
                return inside.then_some(gofunc);
            }
            at += p;
        }
    }
    None
}

/// How a frame prints: `pkg.Func+0xoff file.go:12`, inlined ones marked.
pub fn format_frame(f: &GoFrame) -> String {
    let mut s = f.function.clone();
    if let Some(off) = f.offset {
        s.push_str(&format!("+{off:#x}"));
    }
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let base = file.rsplit('/').next().unwrap_or(file);
        s.push_str(&format!(" {base}:{line}"));
    }
    if f.inlined {
        s.push_str(" (inlined)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_and_old_layouts() {
        assert!(Pclntab::parse(&[]).is_err());
        assert!(Pclntab::parse(&[0xfb, 0xff, 0xff, 0xff, 0, 0, 1, 8])
            .unwrap_err()
            .to_string()
            .contains("1.2-1.15"));
        assert!(Pclntab::parse(&[0xf0, 0xff, 0xff, 0xff, 0, 0, 1, 8]).is_err());
        assert!(Pclntab::parse(&[0xf0, 0xff, 0xff, 0xff, 0, 0, 3, 8, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn varints() {
        let mut pos = 0;
        assert_eq!(varint(&[0x96, 0x01], &mut pos).unwrap(), 150);
        assert_eq!(pos, 2);
        let mut pos = 0;
        assert!(varint(&[0x80, 0x80], &mut pos).is_err());
        let mut pos = 0;
        assert!(varint(&[0xff; 8], &mut pos).is_err());
    }

    #[test]
    fn cstr_rejects_mid_string_offsets() {
        let t = b"\0main.a\0main.bb\0";
        let r = 0..t.len();
        assert_eq!(cstr(t, &r, 1).unwrap(), "main.a");
        assert_eq!(cstr(t, &r, 8).unwrap(), "main.bb");
        assert!(cstr(t, &r, 9).is_err());
        assert!(cstr(t, &r, 0).is_err()); // empty
        assert!(cstr(t, &r, 99).is_err());
    }
}

/// Against real binaries built here with the installed Go toolchain, checked
/// against Go's own reader of the same table (`go tool objdump`, `go tool nm`).
#[cfg(test)]
pub(crate) mod real {
    use std::{
        collections::{HashMap, HashSet},
        path::PathBuf,
        process::Command,
        sync::Mutex,
    };

    use super::*;

    fn go() -> PathBuf {
        let find = || {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .chain([PathBuf::from("/usr/lib/go/bin")])
                .map(|d| d.join("go"))
                .find(|p| p.exists())
        };
        find().unwrap_or_else(|| {
            panic!("no `go` on PATH (Debian package golang-go); run `cargo xtask setup` as root")
        })
    }

    /// tests/go/leakkeys built into target/go-test, default or stripped.
    pub(crate) fn build(stripped: bool) -> PathBuf {
        if stripped {
            build_as("unit-stripped", &["-ldflags", "-s -w"])
        } else {
            build_as("unit-full", &[])
        }
    }

    pub(crate) fn build_as(name: &str, flags: &[&str]) -> PathBuf {
        static LOCK: Mutex<()> = Mutex::new(());
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = root.join("target/go-test");
        std::fs::create_dir_all(&out).expect("creating target/go-test");
        let bin = out.join(name);
        let st = Command::new(go())
            .current_dir(root.join("tests/go/leakkeys"))
            .env("GOCACHE", root.join("target/go-cache"))
            .args(["build", "-o"])
            .arg(&bin)
            .args(flags)
            .arg(".")
            .status()
            .expect("running go build");
        assert!(st.success(), "go build {flags:?} failed: {st}");
        bin
    }

    fn go_tool(args: &[&str]) -> String {
        let out = Command::new(go())
            .arg("tool")
            .args(args)
            .output()
            .expect("running go tool");
        assert!(out.status.success(), "go tool {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (address -> (function, "file.go:line")) for every instruction of main.*.
    fn objdump(bin: &Path) -> HashMap<u64, (String, String)> {
        let text = go_tool(&[
            "objdump",
            "-s",
            "^main\\.",
            bin.to_str().expect("utf-8 path"),
        ]);
        let mut func = String::new();
        let mut out = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("TEXT ") {
                func = rest.split("(SB)").next().unwrap_or("").to_string();
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(pos), Some(addr)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(addr.trim_start_matches("0x"), 16) else {
                continue;
            };
            out.insert(addr, (func.clone(), pos.to_string()));
        }
        assert!(out.len() > 100, "objdump listed too little: {text}");
        out
    }

    /// `go tool objdump` needs the symbol table, so a stripped build is
    /// checked against the unstripped one's listing: `-s -w` drops sections
    /// after the code and leaves every address as it was.
    fn check_against_toolchain(path: &Path, reference: &Path, inline_frames: bool) {
        let bin = GoBinary::open(path).expect("parse").expect("a Go binary");
        assert!(bin.build_id.is_some(), "no build id");
        let want = objdump(reference);
        let mut inlined_seen = false;
        for (&pc, (func, pos)) in &want {
            let frames = bin
                .frames(pc)
                .unwrap_or_else(|e| panic!("{pc:#x}: {e:#}"))
                .unwrap_or_else(|| panic!("{pc:#x} not in the table"));
            let outer = frames.last().expect("a frame");
            assert_eq!(&outer.function, func, "function at {pc:#x}");
            // The innermost frame carries the instruction's own position,
            // whether or not the inlined frames above it could be named.
            let inner = &frames[0];
            let got = format!(
                "{}:{}",
                inner
                    .file
                    .as_deref()
                    .unwrap_or("?")
                    .rsplit('/')
                    .next()
                    .unwrap_or(""),
                inner.line.unwrap_or(-1)
            );
            // objdump prints ":0" where it has no position (some PIE
            // instructions); there is nothing to compare.
            if pos != ":0" {
                assert_eq!(&got, pos, "position at {pc:#x} ({frames:?})");
            }
            if frames.len() > 1 && func == "main.leakKeys" {
                inlined_seen |= frames[0].function == "main.fillPayload"
                    || frames[0].function == "syscall.BytePtrFromString";
                assert!(frames[..frames.len() - 1].iter().all(|f| f.inlined));
            }
        }
        assert_eq!(
            inlined_seen, inline_frames,
            "inlined frames in main.leakKeys: expected {inline_frames}"
        );
    }

    #[test]
    fn names_lines_and_inlining_match_the_toolchain() {
        let full = build(false);
        check_against_toolchain(&full, &full, true);
    }

    #[test]
    fn stripped_binary_names_match_the_toolchain() {
        check_against_toolchain(&build(true), &build(false), true);
    }

    /// PIE: the table sits in `.data.rel.ro.gopclntab` (no `.gopclntab`).
    /// Go's linker also writes moduledata's pointers into the file, not only
    /// as relocations, so inlined frames resolve here too.
    #[test]
    fn pie_binary_names_match_the_toolchain() {
        let full = build_as("unit-pie", &["-buildmode=pie"]);
        let stripped = build_as(
            "unit-pie-stripped",
            &["-buildmode=pie", "-ldflags", "-s -w"],
        );
        check_against_toolchain(&stripped, &full, true);
    }

    /// Every function of the table is named as the unstripped symbol table says.
    #[test]
    fn every_function_matches_the_symbol_table() {
        let path = build(false);
        let bin = GoBinary::open(&path).expect("parse").expect("a Go binary");
        let nm = go_tool(&["nm", path.to_str().expect("utf-8 path")]);
        let syms: HashSet<(u64, &str)> = nm
            .lines()
            .filter_map(|l| {
                // "addr kind name", the name possibly with spaces.
                let mut p = l.trim_start().splitn(3, ' ');
                let addr = u64::from_str_radix(p.next()?, 16).ok()?;
                let kind = p.next()?;
                ["T", "t"].contains(&kind).then_some(())?;
                // Assembly functions carry their ABI in the symbol only.
                let name = p.next()?.trim_end();
                Some((addr, name.strip_suffix(".abi0").unwrap_or(name)))
            })
            .collect();
        let funcs = bin.functions().expect("functions");
        assert!(funcs.len() > 1000, "only {} functions", funcs.len());
        for (entry, name) in &funcs {
            // The table elides array lengths and type arguments as "[...]".
            let found = match name.split_once("[...]") {
                None => syms.contains(&(*entry, name.as_str())),
                Some((pre, post)) => syms
                    .iter()
                    .any(|(a, s)| a == entry && s.starts_with(pre) && s.ends_with(post)),
            };
            assert!(found, "{name} at {entry:#x} is not in the symbol table");
        }
    }

    use crate::test_rng::Rng;

    /// Randomly corrupted and truncated copies of a real table: parsing and
    /// lookups give errors, never panics, and while the name table itself is
    /// intact every name given out is one of the binary's function names.
    #[test]
    fn corrupted_tables_error_and_never_panic() {
        let path = build(true);
        let bin = GoBinary::open(&path).expect("parse").expect("a Go binary");
        let good = bin.table_bytes().to_vec();
        let t = Pclntab::parse(&good).expect("real table");
        // Every string of the name table (inlined-only functions included): a
        // corrupted name offset that lands on another name's start cannot be
        // told from a real one, but it must never produce anything else.
        let names: HashSet<String> = good[t.funcnametab.clone()]
            .split(|&b| b == 0)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        let range = t.pc_range(&good).expect("range");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let ftab_len = (t.nfunc + 1) * t.ftab_stride();
        let no_mem = |_: u64, _: usize| None;
        let mut parsed = 0;
        for round in 0..400 {
            let mut bad = good.clone();
            let mut touched_names = false;
            let edits = 1 + rng.below(8);
            for _ in 0..edits {
                // Aim at the structures most likely to mislead: header,
                // function table, _func records; and anywhere.
                let at = match rng.below(4) {
                    0 => rng.below(80),
                    1 => t.pcln + rng.below(ftab_len),
                    2 => t.pcln + ftab_len + rng.below(good.len() - t.pcln - ftab_len),
                    _ => rng.below(good.len()),
                };
                touched_names |= t.funcnametab.contains(&at);
                bad[at] = rng.next() as u8;
            }
            if round % 10 == 0 {
                bad.truncate(rng.below(bad.len()));
            }
            let Ok(mt) = Pclntab::parse(&bad) else {
                continue;
            };
            parsed += 1;
            for _ in 0..300 {
                let pc = range.start + rng.below((range.end - range.start) as usize) as u64;
                if let Ok(Some(frames)) = mt.frames(&bad, pc, &no_mem, None) {
                    for f in &frames {
                        assert!(
                            touched_names || names.contains(&f.function),
                            "round {round}: made-up name {:?}",
                            f.function
                        );
                    }
                }
            }
        }
        assert!(
            parsed > 50,
            "too few corrupted tables parsed ({parsed}) to exercise lookups"
        );
    }

    #[test]
    fn non_go_files_are_not_go() {
        let me = std::env::current_exe().expect("test binary");
        assert!(GoBinary::open(&me).expect("open").is_none());
        let notelf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        assert!(GoBinary::open(&notelf).expect("open").is_none());
    }
}

/// Tables in each layout, written by a small encoder from the runtime's
/// struct definitions: this machine's Go (Debian's) only builds one layout, so
/// the others are covered by construction, not by real binaries.
#[cfg(test)]
mod synthetic {
    use super::*;

    const TEXT: u64 = 0x40_1000;
    const GOFUNC: u64 = 0x50_0000;

    fn uvarint(out: &mut Vec<u8>, mut v: u32) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A pc-value table: (value, up to pc offset) runs.
    fn pcvalue(out: &mut Vec<u8>, runs: &[(i32, u32)]) -> u32 {
        let at = out.len() as u32;
        let (mut val, mut pc) = (-1i32, 0u32);
        for &(v, end) in runs {
            let d = v - val;
            uvarint(
                out,
                if d < 0 {
                    ((!d as u32) << 1) | 1
                } else {
                    (d as u32) << 1
                },
            );
            uvarint(out, end - pc);
            val = v;
            pc = end;
        }
        out.push(0);
        at
    }

    struct Built {
        tab: Vec<u8>,
        /// Memory at GOFUNC (1.18+) or the absolute inline tree (1.16).
        rodata: Vec<u8>,
    }

    /// main.outer at TEXT (0x40 bytes; main.inner inlined over 0x10..0x20,
    /// called from parent pc 0x08), main.other at TEXT+0x40 (0x20 bytes).
    fn build(version: Version) -> Built {
        let ptr = 8usize;
        let names = b"main.outer\0main.inner\0main.other\0".to_vec();
        let (outer_name, inner_name, other_name) = (0u32, 11u32, 22u32);
        let cutab: Vec<u8> = 0u32.to_le_bytes().to_vec();
        let filetab = b"/src/main.go\0".to_vec();
        let mut pctab = vec![0u8];
        let outer_file = pcvalue(&mut pctab, &[(0, 0x40)]);
        let outer_line = pcvalue(&mut pctab, &[(12, 0x10), (5, 0x20), (13, 0x40)]);
        let outer_inl = pcvalue(&mut pctab, &[(-1, 0x10), (0, 0x20), (-1, 0x40)]);
        let other_file = pcvalue(&mut pctab, &[(0, 0x20)]);
        let other_line = pcvalue(&mut pctab, &[(30, 0x20)]);
        // One inlinedCall: main.inner, called at parent pc 0x08.
        let mut rodata = Vec::new();
        match version {
            Version::Go120 => {
                rodata.extend([0u8; 4]); // funcID, pad
                rodata.extend((inner_name as i32).to_le_bytes());
                rodata.extend(8i32.to_le_bytes()); // parentPc
                rodata.extend(4i32.to_le_bytes()); // startLine
            }
            _ => {
                rodata.extend((-1i16).to_le_bytes()); // parent
                rodata.extend([0u8; 2]); // funcID, pad
                rodata.extend(0i32.to_le_bytes()); // file
                rodata.extend(12i32.to_le_bytes()); // line
                rodata.extend((inner_name as i32).to_le_bytes());
                rodata.extend(8i32.to_le_bytes()); // parentPc
            }
        }
        let header_words = if version == Version::Go116 { 7 } else { 8 };
        let header = 8 + header_words * ptr;
        let funcname_off = header;
        let cu_off = funcname_off + names.len();
        let file_off = cu_off + cutab.len();
        let pc_off = file_off + filetab.len();
        let mut pcln_off = pc_off + pctab.len();
        pcln_off = pcln_off.next_multiple_of(ptr);

        // _func records after the function table.
        let stride = if version == Version::Go116 {
            2 * ptr
        } else {
            8
        };
        let ftab_len = 3 * stride;
        let func = |entry_off: u32, name: u32, file: u32, line: u32, inl: Option<u32>| {
            let mut f = Vec::new();
            if version == Version::Go116 {
                f.extend((TEXT + u64::from(entry_off)).to_le_bytes());
            } else {
                f.extend(entry_off.to_le_bytes());
            }
            let npcdata = if inl.is_some() { 3u32 } else { 0 };
            for v in [name, 0, 0, 0, file, line, npcdata, 0] {
                f.extend(v.to_le_bytes()); // nameoff args deferreturn pcsp pcfile pcln npcdata cuOffset
            }
            if version == Version::Go120 {
                f.extend(0u32.to_le_bytes()); // startLine
            }
            let nfuncdata = if inl.is_some() { 4u8 } else { 0 };
            f.extend([0, 0, 0, nfuncdata]);
            if let Some(inl) = inl {
                f.extend([0u32, 0, inl].iter().flat_map(|v| v.to_le_bytes()));
                if version == Version::Go116 {
                    if !(pcln_off + ftab_len + f.len()).is_multiple_of(8) {
                        f.extend([0u8; 4]);
                    }
                    for i in 0..4u64 {
                        let p: u64 = if i == 3 { GOFUNC } else { 0 };
                        f.extend(p.to_le_bytes());
                    }
                } else {
                    for i in 0..4u32 {
                        let o: u32 = if i == 3 { 0 } else { u32::MAX };
                        f.extend(o.to_le_bytes());
                    }
                }
            }
            while !f.len().is_multiple_of(ptr) {
                f.push(0);
            }
            f
        };
        let outer = func(0, outer_name, outer_file, outer_line, Some(outer_inl));
        let other = func(0x40, other_name, other_file, other_line, None);
        let mut pcln = Vec::new();
        let slots = [(0u64, ftab_len), (0x40, ftab_len + outer.len()), (0x60, 0)];
        for (entry_off, funcoff) in slots {
            if version == Version::Go116 {
                pcln.extend((TEXT + entry_off).to_le_bytes());
                pcln.extend((funcoff as u64).to_le_bytes());
            } else {
                pcln.extend((entry_off as u32).to_le_bytes());
                pcln.extend((funcoff as u32).to_le_bytes());
            }
        }
        pcln.extend(&outer);
        pcln.extend(&other);

        let magic = match version {
            Version::Go116 => MAGIC_116,
            Version::Go118 => MAGIC_118,
            Version::Go120 => MAGIC_120,
        };
        let mut tab = magic.to_le_bytes().to_vec();
        tab.extend([0, 0, 1, ptr as u8]);
        let mut words = vec![2u64, 1];
        if version != Version::Go116 {
            words.push(TEXT);
        }
        words.extend([funcname_off, cu_off, file_off, pc_off, pcln_off].map(|o| o as u64));
        for w in words {
            tab.extend(w.to_le_bytes());
        }
        tab.extend(&names);
        tab.extend(&cutab);
        tab.extend(&filetab);
        tab.extend(&pctab);
        tab.resize(pcln_off, 0);
        tab.extend(&pcln);
        Built { tab, rodata }
    }

    fn check(version: Version) {
        let b = build(version);
        let t = Pclntab::parse(&b.tab).expect("parse");
        assert_eq!(t.version, version);
        let mem = |a: u64, n: usize| {
            let off = usize::try_from(a.checked_sub(GOFUNC)?).ok()?;
            b.rodata.get(off..off + n).map(<[u8]>::to_vec)
        };
        let gofunc = (version != Version::Go116).then_some(GOFUNC);
        let at = |pc: u64| {
            t.frames(&b.tab, TEXT + pc, &mem, gofunc)
                .expect("lookup")
                .map(|f| f.iter().map(format_frame).collect::<Vec<_>>())
        };
        assert_eq!(at(0x4).unwrap(), ["main.outer+0x4 main.go:12"]);
        assert_eq!(
            at(0x14).unwrap(),
            [
                "main.inner main.go:5 (inlined)",
                "main.outer+0x14 main.go:12"
            ]
        );
        assert_eq!(at(0x30).unwrap(), ["main.outer+0x30 main.go:13"]);
        assert_eq!(at(0x44).unwrap(), ["main.other+0x4 main.go:30"]);
        assert_eq!(at(0x60), None);
        assert_eq!(
            t.functions(&b.tab).unwrap(),
            [
                (TEXT, "main.outer".into()),
                (TEXT + 0x40, "main.other".into())
            ]
        );
        // Without the inline tree's memory the physical function still names it.
        let none = |_: u64, _: usize| None;
        let f = t.frames(&b.tab, TEXT + 0x14, &none, None).unwrap().unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].function, "main.outer");
        // Every truncation is an error or a consistent table, never a panic.
        for len in 0..b.tab.len() {
            if let Ok(t) = Pclntab::parse(&b.tab[..len]) {
                for pc in (0..0x70).step_by(4) {
                    let _ = t.frames(&b.tab[..len], TEXT + pc, &mem, gofunc);
                }
            }
        }
    }

    #[test]
    fn go116_layout() {
        check(Version::Go116);
    }

    #[test]
    fn go118_layout() {
        check(Version::Go118);
    }

    #[test]
    fn go120_layout() {
        check(Version::Go120);
    }

    /// A record whose entry disagrees with the function table is refused, not
    /// named: the signature of a shifted or corrupted table.
    #[test]
    fn entry_mismatch_is_an_error() {
        let mut b = build(Version::Go120);
        let t = Pclntab::parse(&b.tab).expect("parse");
        let (_, funcoff) = t.ftab(&b.tab, 1).expect("slot");
        let at = t.pcln + funcoff;
        b.tab[at] ^= 0x04;
        let none = |_: u64, _: usize| None;
        assert!(t.frames(&b.tab, TEXT + 0x44, &none, None).is_err());
    }
}
