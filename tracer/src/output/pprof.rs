//! `--pprof FILE`: the report as a gzipped pprof profile, so `go tool pprof`
//! (and every UI that reads its format) opens a leak without glue.
//!
//! The messages are profile.proto (github.com/google/pprof/proto/profile.proto)
//! written down with prost's derive: no protoc at build time, and only the
//! fields leaktrace fills. Field numbers are the wire format; they must not change.

use std::collections::HashMap;

use anyhow::{Context, Result};
use flate2::{write::GzEncoder, Compression};
use prost::Message;

use crate::slab::report::{Location as Frames, MemorySource, ProcessReport, Report};

#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Innermost (inlined) first.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Sample value order; `go tool pprof -sample_index=NAME` picks one.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("outstanding_objects", "count"),
    ("outstanding_space", "bytes"),
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
];

/// Interns strings, functions, locations and mappings: pprof refers to each
/// by index or id, and a leak's thousands of samples share a few stacks.
#[derive(Default)]
pub(crate) struct Builder {
    pub(crate) profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<String, u64>,
    /// (mapping, address, frames): user addresses are per address space, so
    /// the mapping (one per process) is part of the key.
    locations: HashMap<(u64, u64, Vec<String>), u64>,
    mappings: HashMap<String, u64>,
    /// Mapped user files by (path, start, end): one per library per address
    /// space layout, which is what pprof's Mapping describes.
    files: HashMap<(String, u64, u64), u64>,
}

impl Builder {
    pub(crate) fn new() -> Builder {
        let mut b = Builder::default();
        // pprof requires string_table[0] == "".
        b.string("");
        b
    }

    /// The profile's sample types, (name, unit) each, and the one pprof shows first.
    pub(crate) fn sample_types(&mut self, types: &[(&str, &str)], default: &str) {
        for (name, unit) in types {
            let vt = ValueType {
                r#type: self.string(name),
                unit: self.string(unit),
            };
            self.profile.sample_type.push(vt);
        }
        self.profile.default_sample_type = self.string(default);
    }

    pub(crate) fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    pub(crate) fn mapping(&mut self, file: &str) -> u64 {
        if let Some(&id) = self.mappings.get(file) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(file);
        self.profile.mapping.push(Mapping {
            id,
            filename,
            // Names come from leaktrace's symbolizer; pprof must not try again.
            has_functions: true,
            ..Mapping::default()
        });
        self.mappings.insert(file.to_string(), id);
        id
    }

    /// The Mapping of a user file: addresses, file offset and build id, so
    /// `pprof` names its unnamed frames `[libc.so.6]` and can symbolize them
    /// from the same build (`has_functions` is cleared once a frame in it is
    /// left unnamed).
    fn file_mapping(
        &mut self,
        path: &str,
        start: u64,
        end: u64,
        offset: u64,
        build_id: &str,
    ) -> u64 {
        let key = (path.to_string(), start, end);
        if let Some(&id) = self.files.get(&key) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(path);
        let build_id = self.string(build_id);
        self.profile.mapping.push(Mapping {
            id,
            memory_start: start,
            memory_limit: end,
            file_offset: offset,
            filename,
            build_id,
            has_functions: true,
            ..Mapping::default()
        });
        self.files.insert(key, id);
        id
    }

    /// A user location: in its file's Mapping where known, else the
    /// process's. A frame leaktrace could not name (`libc.so.6+0x2724a`,
    /// `[unknown] 0x…`) gets no function, so pprof shows the address and the
    /// file instead of a made-up function named after the file.
    pub(crate) fn user_location(&mut self, process_mapping: u64, loc: &Frames) -> u64 {
        let Some(file) = &loc.module else {
            return self.location(process_mapping, loc);
        };
        let mapping = self.file_mapping(
            &file.path,
            file.start,
            file.end,
            file.offset,
            &file.build_id,
        );
        let base = file.path.rsplit('/').next().unwrap_or(&file.path);
        let unnamed = loc
            .frames
            .iter()
            .all(|f| f.starts_with("[unknown]") || function_name(f) == base);
        if !unnamed {
            return self.location(mapping, loc);
        }
        if let Some(m) = self.profile.mapping.get_mut(mapping as usize - 1) {
            m.has_functions = false;
        }
        let bare = Frames {
            addr: loc.addr,
            frames: Vec::new(),
            module: None,
        };
        self.location(mapping, &bare)
    }

    /// The function of a frame (one per name and source file) and the frame's
    /// source line (0 when the symbolizer gave none).
    fn function(&mut self, frame: &str) -> (u64, i64) {
        let (name, source) = split_frame(frame);
        let (file, line) = source.unwrap_or(("", 0));
        let key = format!("{name}\0{file}");
        if let Some(&id) = self.functions.get(&key) {
            return (id, line);
        }
        let id = self.profile.function.len() as u64 + 1;
        let name_ix = self.string(name);
        let filename = self.string(file);
        self.profile.function.push(Function {
            id,
            name: name_ix,
            system_name: name_ix,
            filename,
        });
        self.functions.insert(key, id);
        (id, line)
    }

    /// The locations of a stack of named frames without addresses, in the
    /// order given (leaf first), for reports that keep names only, as
    /// memcg's pinning stacks.
    pub(crate) fn named_locations(&mut self, mapping_id: u64, names: &[String]) -> Vec<u64> {
        names
            .iter()
            .map(|name| {
                let loc = Frames {
                    addr: 0,
                    frames: vec![name.clone()],
                    module: None,
                };
                self.location(mapping_id, &loc)
            })
            .collect()
    }

    pub(crate) fn location(&mut self, mapping_id: u64, loc: &Frames) -> u64 {
        let key = (mapping_id, loc.addr, loc.frames.clone());
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        let line = loc
            .frames
            .iter()
            .map(|f| {
                let (function_id, line) = self.function(f);
                Line { function_id, line }
            })
            .collect();
        self.profile.location.push(Location {
            id,
            mapping_id,
            address: loc.addr,
            line,
        });
        self.locations.insert(key, id);
        id
    }
}

/// A frame as the symbolizer writes it, `NAME[+0xOFF][ FILE:LINE][ (inlined)]`
/// (Go frames carry their pclntab file and line), as (function name,
/// (file, line)).
fn split_frame(frame: &str) -> (&str, Option<(&str, i64)>) {
    let text = frame.strip_suffix(" (inlined)").unwrap_or(frame);
    let source = text.rsplit_once(' ').and_then(|(head, last)| {
        let (file, line) = last.rsplit_once(':')?;
        let line = line.parse::<i64>().ok()?;
        (!file.is_empty()).then_some((head, (file, line)))
    });
    match source {
        Some((head, at)) => (function_name(head), Some(at)),
        None => (function_name(text), None),
    }
}

/// "user_preparse+0x2f" -> "user_preparse": pprof aggregates by function, and
/// the address already says where in it. Unnamed frames keep their text.
pub fn function_name(frame: &str) -> &str {
    match frame.rsplit_once("+0x") {
        Some((name, off)) if !name.is_empty() && off.chars().all(|c| c.is_ascii_hexdigit()) => name,
        _ => frame,
    }
}

/// The file a process runs, for its mapping's name: argv[0] as /proc showed
/// it, else the command name.
pub(crate) fn process_image(p: &ProcessReport) -> String {
    p.cmdline
        .as_deref()
        .and_then(|c| c.split_whitespace().next())
        .map_or_else(|| p.comm.clone(), str::to_string)
}

/// Bytes per object: every object of a slab cache (and of the caches merged
/// into it) has the cache's size, so allocated bytes are allocations times it.
fn object_size(report: &Report) -> u64 {
    report
        .slab
        .as_ref()
        .map(|s| s.objsize)
        .filter(|&s| s > 0)
        .unwrap_or_else(|| report.totals.outstanding_bytes / report.totals.outstanding.max(1))
}

pub fn build(report: &Report, wall_clock_ns: i64) -> Profile {
    let mut b = Builder::new();
    // Outstanding bytes is what the question "who holds the memory" is about.
    b.sample_types(&SAMPLE_TYPES, "outstanding_space");
    b.profile.period_type = Some(ValueType {
        r#type: b.string("alloc_objects"),
        unit: b.string("count"),
    });
    b.profile.period = 1;
    b.profile.time_nanos = wall_clock_ns;
    b.profile.duration_nanos = (report.elapsed_s * 1e9) as i64;
    let comment = b.string(&format!(
        "leaktrace {} report, {}; only objects allocated after attach are counted",
        report.kind,
        report.traced()
    ));
    b.profile.comment.push(comment);
    let sample_every = report.stacks.sample_every;
    if sample_every > 1 {
        let comment = b.string(&format!(
            "per-stack values with label attribution=estimate are unbiased estimates from the \
             full stacks drawn (each new stratum's first {} allocations per CPU, zoomed strata \
             more often, a random 1 in {sample_every} of the rest; every draw's probability \
             recorded; label outstanding_95 gives the interval); per-process totals are exact",
            report.stacks.census_allocs
        ));
        b.profile.comment.push(comment);
    }

    let objsize = object_size(report);
    let percpu = report.source == MemorySource::Percpu;
    if percpu {
        // The report counts bytes of outstanding allocations only.
        let comment = b.string(
            "per-CPU allocations differ in size: alloc_space is each stack's allocations x \
             the mean size of its outstanding ones (of all, where none is outstanding), an \
             approximation; outstanding_space is exact",
        );
        b.profile.comment.push(comment);
    }
    let kernel_mapping = b.mapping("[kernel.kallsyms]");
    let keys = [
        b.string("pid"),
        b.string("comm"),
        b.string("cgroup"),
        b.string("cache"),
        b.string("attribution"),
        b.string("outstanding_95"),
    ];
    let [exact, estimate, partial] =
        ["exact", "estimate", "exact, shared frames only"].map(|v| b.string(v));
    let cache = b.string(&report.cache);
    for p in &report.processes {
        let user_mapping = b.mapping(&process_image(p));
        let comm = b.string(&p.comm);
        let cgroup = b.string(
            &p.cgroup
                .clone()
                .unwrap_or_else(|| format!("id {}", p.cgroup_id)),
        );
        for s in &p.stacks {
            let mut location_id: Vec<u64> = s
                .kernel_locations
                .iter()
                .map(|l| b.location(kernel_mapping, l))
                .collect();
            location_id.extend(
                s.user_locations
                    .iter()
                    .map(|l| b.user_location(user_mapping, l)),
            );
            let c = &s.counts;
            let size = match c.outstanding_bytes.checked_div(c.outstanding) {
                Some(mean) if percpu => mean,
                _ => objsize,
            };
            let value = [
                c.outstanding,
                c.outstanding_bytes,
                c.allocs,
                c.allocs.saturating_mul(size),
            ]
            .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
            .to_vec();
            let attribution = if s.partial {
                partial
            } else if s.estimated {
                estimate
            } else {
                exact
            };
            let range = b.string(&format!("{}-{}", s.outstanding_low, s.outstanding_high));
            b.profile.sample.push(Sample {
                location_id,
                value,
                label: vec![
                    Label {
                        key: keys[0],
                        num: i64::from(p.tgid),
                        ..Label::default()
                    },
                    Label {
                        key: keys[1],
                        str: comm,
                        ..Label::default()
                    },
                    Label {
                        key: keys[2],
                        str: cgroup,
                        ..Label::default()
                    },
                    Label {
                        key: keys[3],
                        str: cache,
                        ..Label::default()
                    },
                    Label {
                        key: keys[4],
                        str: attribution,
                        ..Label::default()
                    },
                    Label {
                        key: keys[5],
                        str: range,
                        ..Label::default()
                    },
                ],
            });
        }
    }
    b.profile
}

/// Gzipped, as `go tool pprof` and pprof's other readers expect.
pub fn encode(profile: &Profile) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&profile.encode_to_vec())
        .context("compressing the pprof profile")?;
    gz.finish().context("compressing the pprof profile")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_lose_only_a_hex_offset() {
        assert_eq!(function_name("user_preparse+0x2f"), "user_preparse");
        assert_eq!(
            function_name("leakgen::sys_add_key+0x25"),
            "leakgen::sys_add_key"
        );
        assert_eq!(function_name("[kernel] 0xffff1234"), "[kernel] 0xffff1234");
        assert_eq!(function_name("libc.so.6+0x1234"), "libc.so.6");
        assert_eq!(function_name("a+b+0xzz"), "a+b+0xzz");
    }

    #[test]
    fn a_report_becomes_samples_with_addresses_inlined_lines_and_labels() {
        let report = crate::slab::report::test_report();
        let bytes = encode(&build(&report, 7)).expect("encode");
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut raw)
            .expect("gzip");
        let p = Profile::decode(raw.as_slice()).expect("decode");
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<&str> = p.sample_type.iter().map(|t| s(t.r#type)).collect();
        assert_eq!(
            types,
            [
                "outstanding_objects",
                "outstanding_space",
                "alloc_objects",
                "alloc_space"
            ]
        );
        assert_eq!(s(p.default_sample_type), "outstanding_space");
        assert_eq!(p.sample.len(), 1);
        let sample = &p.sample[0];
        // No slabinfo in the fixture: object size from the totals (2048 / 4).
        assert_eq!(sample.value, [4, 2048, 10, 5120]);
        let loc = |id: u64| &p.location[id as usize - 1];
        let names = |id: u64| -> Vec<&str> {
            loc(id)
                .line
                .iter()
                .map(|l| s(p.function[l.function_id as usize - 1].name))
                .collect()
        };
        // Leaf first: kernel allocator, then up to user main; inlined frames
        // share their address's location, innermost first.
        let ids = &sample.location_id;
        assert_eq!(ids.len(), 4);
        assert_eq!(names(ids[0]), ["__kmalloc"]);
        assert_eq!(loc(ids[0]).address, 0xffff_0010);
        assert_eq!(names(ids[2]), ["inlined", "outer"]);
        assert_eq!(loc(ids[2]).address, 0x1000);
        let mapping = |id: u64| s(p.mapping[loc(id).mapping_id as usize - 1].filename);
        assert_eq!(mapping(ids[0]), "[kernel.kallsyms]");
        assert_eq!(mapping(ids[3]), "/usr/bin/leaker");
        let label = |k: &str| sample.label.iter().find(|l| s(l.key) == k).expect(k);
        assert_eq!(label("pid").num, 42);
        assert_eq!(s(label("comm").str), "leak;er");
        assert_eq!(s(label("cgroup").str), "/pods/a");
        assert_eq!(s(label("cache").str), "kmalloc-512");
    }

    #[test]
    fn user_frames_sit_in_their_files_mapping_and_unnamed_ones_carry_no_function() {
        let libc = std::sync::Arc::new(crate::slab::report::MappedFile {
            path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            start: 0x7f00_0002_8000,
            end: 0x7f00_0017_d000,
            offset: 0x26000,
            build_id: "c047672cae7964324658491e7dee26748ae5d2f8".into(),
        });
        let mut b = Builder::new();
        let process = b.mapping("/usr/bin/leaker");
        let unnamed = b.user_location(
            process,
            &Frames {
                addr: 0x7f00_0002_924a,
                frames: vec!["libc.so.6+0x2724a".into()],
                module: Some(libc.clone()),
            },
        );
        let named = b.user_location(
            process,
            &Frames {
                addr: 0x7f00_0009_0000,
                frames: vec!["writev+0x17".into()],
                module: Some(libc),
            },
        );
        let unknown = b.user_location(
            process,
            &Frames {
                addr: 0x1234,
                frames: vec!["[unknown] 0x1234".into()],
                module: None,
            },
        );
        let p = &b.profile;
        let loc = |id: u64| &p.location[id as usize - 1];
        let m = &p.mapping[loc(unnamed).mapping_id as usize - 1];
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(m.filename), "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(s(m.build_id), "c047672cae7964324658491e7dee26748ae5d2f8");
        assert_eq!(
            (m.memory_start, m.memory_limit, m.file_offset),
            (0x7f00_0002_8000, 0x7f00_0017_d000, 0x26000)
        );
        // pprof may symbolize the unnamed one from the same build.
        assert!(!m.has_functions);
        assert!(loc(unnamed).line.is_empty());
        assert_eq!(loc(named).mapping_id, loc(unnamed).mapping_id);
        assert_eq!(loc(named).line.len(), 1);
        // Without a known file it stays in the process's mapping, as text.
        assert_eq!(loc(unknown).mapping_id, process);
        assert_eq!(loc(unknown).line.len(), 1);
    }

    #[test]
    fn go_frames_keep_their_file_and_line_and_share_one_function() {
        assert_eq!(
            split_frame("main.leakKeys+0x25 main.go:31"),
            ("main.leakKeys", Some(("main.go", 31)))
        );
        assert_eq!(
            split_frame("main.retryConnect main.go:50 (inlined)"),
            ("main.retryConnect", Some(("main.go", 50)))
        );
        assert_eq!(split_frame("user_preparse+0x2f"), ("user_preparse", None));
        assert_eq!(
            split_frame("[kernel] 0xffff1234"),
            ("[kernel] 0xffff1234", None)
        );
        assert_eq!(
            split_frame("(anonymous namespace)::f+0x1"),
            ("(anonymous namespace)::f", None)
        );
        let mut b = Builder::new();
        let m = b.mapping("/usr/bin/kubelet");
        let at = |b: &mut Builder, addr: u64, frame: &str| {
            b.location(
                m,
                &Frames {
                    addr,
                    frames: vec![frame.into()],
                    module: None,
                },
            )
        };
        let l1 = at(&mut b, 0x10, "main.leakKeys+0x25 main.go:31");
        let l2 = at(&mut b, 0x20, "main.leakKeys+0x41 main.go:35");
        let p = &b.profile;
        let line = |id: u64| &p.location[id as usize - 1].line[0];
        assert_eq!((line(l1).line, line(l2).line), (31, 35));
        assert_eq!(line(l1).function_id, line(l2).function_id);
        let f = &p.function[line(l1).function_id as usize - 1];
        assert_eq!(p.string_table[f.name as usize], "main.leakKeys");
        assert_eq!(p.string_table[f.filename as usize], "main.go");
    }

    #[test]
    fn interning_shares_functions_and_keeps_string_zero_empty() {
        let mut b = Builder::new();
        assert_eq!(b.profile.string_table[0], "");
        let m = b.mapping("[kernel.kallsyms]");
        let l1 = b.location(
            m,
            &Frames {
                addr: 0x10,
                frames: vec!["f+0x1".into()],
                module: None,
            },
        );
        let l2 = b.location(
            m,
            &Frames {
                addr: 0x20,
                frames: vec!["f+0x2".into()],
                module: None,
            },
        );
        let l3 = b.location(
            m,
            &Frames {
                addr: 0x10,
                frames: vec!["f+0x1".into()],
                module: None,
            },
        );
        assert_ne!(l1, l2);
        assert_eq!(l1, l3);
        assert_eq!(b.profile.function.len(), 1);
        let decoded = Profile::decode(b.profile.encode_to_vec().as_slice()).expect("round trip");
        assert_eq!(decoded, b.profile);
    }
}
