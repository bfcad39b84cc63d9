use super::format::strip_field_prefix;
use super::print_flags::{flag_entry, print_flag_calls, split_top_level};
use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/formats");
const KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "6.18"];

fn fixture_text(kernel: &str, system: &str, event: &str) -> String {
    let path = format!("{FIXTURES}/{kernel}/events/{system}/{event}/format");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

fn fixture(kernel: &str, system: &str, event: &str) -> EventFormat {
    EventFormat::parse(system, event, &fixture_text(kernel, system, event))
        .unwrap_or_else(|e| panic!("{kernel}: {e}"))
}

/// Every fixture file as (kernel, system, event, text).
fn all_fixtures() -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for kernel in KERNELS {
        let kdir = Path::new(FIXTURES).join(kernel).join("events");
        for system in fs::read_dir(&kdir).unwrap() {
            let system = system.unwrap();
            for event in fs::read_dir(system.path()).unwrap() {
                let event = event.unwrap();
                let text = fs::read_to_string(event.path().join("format")).unwrap();
                out.push((
                    kernel.to_string(),
                    system.file_name().to_string_lossy().into_owned(),
                    event.file_name().to_string_lossy().into_owned(),
                    text,
                ));
            }
        }
    }
    assert!(
        out.len() >= 4 * 7,
        "expected at least 7 fixtures per kernel"
    );
    out
}

/// (field, offset, size) expectations; `None` offset means the field must be absent.
type Layout = &'static [(&'static str, Option<u16>, u16)];

struct Expected {
    kernel: &'static str,
    kmalloc: Layout,
    kfree: Layout,
    kmem_cache_alloc: Layout,
    kmem_cache_free: Layout,
    /// `__GFP_ACCOUNT`, `__GFP_RECLAIMABLE`, `__GFP_DMA` as print fmt names them.
    gfp_account: Option<u64>,
    gfp_reclaimable: Option<u64>,
    gfp_dma: Option<u64>,
    /// Whether the `__data_loc` path/name descriptors are printed as signed (old kernels do).
    data_loc_signed: bool,
}

// GFP values per kernel source: 5.10 include/linux/gfp.h and 6.1 include/linux/gfp_types.h
// define ___GFP_DMA 0x01u, ___GFP_RECLAIMABLE 0x10u, ___GFP_ACCOUNT 0x400000u; 6.12 and
// 6.18 gfp_types.h derive them from an enum of bit numbers (DMA 0, RECLAIMABLE 4,
// ACCOUNT 22), i.e. the same values. Up to 6.12 mmflags.h prints bit 0 only as
// `GFP_DMA`; 6.18 lists `__GFP_DMA` (and every other ___GFP_*_BIT) as well.
const EXPECTED: [Expected; 4] = [
    Expected {
        kernel: "5.10",
        kmalloc: &[
            ("ptr", Some(16), 8),
            ("bytes_req", Some(24), 8),
            ("bytes_alloc", Some(32), 8),
            ("gfp_flags", Some(40), 4),
            ("node", None, 0),
        ],
        kfree: &[("ptr", Some(16), 8)],
        kmem_cache_alloc: &[
            ("ptr", Some(16), 8),
            ("bytes_alloc", Some(32), 8),
            ("gfp_flags", Some(40), 4),
            ("name", None, 0),
            ("accounted", None, 0),
        ],
        kmem_cache_free: &[("ptr", Some(16), 8), ("name", None, 0)],
        gfp_account: Some(0x40_0000),
        gfp_reclaimable: Some(0x10),
        gfp_dma: None,
        data_loc_signed: true,
    },
    Expected {
        kernel: "6.1",
        kmalloc: &[
            ("ptr", Some(16), 8),
            ("bytes_req", Some(24), 8),
            ("bytes_alloc", Some(32), 8),
            ("gfp_flags", Some(40), 8),
            ("node", Some(48), 4),
        ],
        kfree: &[("ptr", Some(16), 8)],
        kmem_cache_alloc: &[
            ("ptr", Some(16), 8),
            ("bytes_alloc", Some(32), 8),
            ("gfp_flags", Some(40), 8),
            ("name", None, 0),
            ("accounted", Some(52), 1),
        ],
        kmem_cache_free: &[("ptr", Some(16), 8), ("name", Some(24), 4)],
        gfp_account: Some(0x40_0000),
        gfp_reclaimable: Some(0x10),
        gfp_dma: None,
        data_loc_signed: true,
    },
    Expected {
        kernel: "6.12",
        kmalloc: &[
            ("ptr", Some(16), 8),
            ("bytes_req", Some(24), 8),
            ("bytes_alloc", Some(32), 8),
            ("gfp_flags", Some(40), 8),
            ("node", Some(48), 4),
        ],
        kfree: &[("ptr", Some(16), 8)],
        kmem_cache_alloc: &[
            ("ptr", Some(16), 8),
            ("bytes_alloc", Some(32), 8),
            ("gfp_flags", Some(40), 8),
            ("name", None, 0),
            ("accounted", Some(52), 1),
        ],
        kmem_cache_free: &[("ptr", Some(16), 8), ("name", Some(24), 4)],
        gfp_account: Some(1 << 22),
        gfp_reclaimable: Some(1 << 4),
        gfp_dma: None,
        data_loc_signed: false,
    },
    Expected {
        kernel: "6.18",
        kmalloc: &[
            ("ptr", Some(16), 8),
            ("bytes_req", Some(24), 8),
            ("bytes_alloc", Some(32), 8),
            ("gfp_flags", Some(40), 8),
            ("node", Some(48), 4),
        ],
        kfree: &[("ptr", Some(16), 8)],
        kmem_cache_alloc: &[
            ("ptr", Some(16), 8),
            ("name", Some(24), 4),
            ("bytes_alloc", Some(40), 8),
            ("gfp_flags", Some(48), 8),
            ("accounted", Some(60), 1),
        ],
        kmem_cache_free: &[("ptr", Some(16), 8), ("name", Some(24), 4)],
        gfp_account: Some(1 << 22),
        gfp_reclaimable: Some(1 << 4),
        gfp_dma: Some(1),
        data_loc_signed: false,
    },
];

fn check_layout(kernel: &str, format: &EventFormat, layout: Layout) {
    for &(name, offset, size) in layout {
        let what = format!("{kernel} {}/{} {name}", format.system, format.name);
        match offset {
            Some(offset) => {
                assert_eq!(format.offset_of(name, size).ok(), Some(offset), "{what}")
            }
            None => assert!(format.field(name).is_none(), "{what} should be absent"),
        }
    }
}

#[test]
fn kmem_layouts_per_kernel() {
    for e in &EXPECTED {
        check_layout(e.kernel, &fixture(e.kernel, "kmem", "kmalloc"), e.kmalloc);
        check_layout(e.kernel, &fixture(e.kernel, "kmem", "kfree"), e.kfree);
        check_layout(
            e.kernel,
            &fixture(e.kernel, "kmem", "kmem_cache_alloc"),
            e.kmem_cache_alloc,
        );
        check_layout(
            e.kernel,
            &fixture(e.kernel, "kmem", "kmem_cache_free"),
            e.kmem_cache_free,
        );
    }
}

#[test]
fn data_loc_fields_are_marked() {
    for e in EXPECTED.iter().filter(|e| e.kernel != "5.10") {
        let free = fixture(e.kernel, "kmem", "kmem_cache_free");
        let name = free.field("name").unwrap();
        assert!(name.data_loc && !name.rel_loc, "{}", e.kernel);
        assert_eq!(name.c_type, "char[]");
        assert_eq!(name.signed, e.data_loc_signed, "{}", e.kernel);
    }
}

#[test]
fn node_variants_exist_only_on_5_10() {
    let node = fixture("5.10", "kmem", "kmalloc_node");
    assert_eq!(node.offset_of("gfp_flags", 4).unwrap(), 40);
    assert_eq!(node.offset_of("node", 4).unwrap(), 44);
    let cache_node = fixture("5.10", "kmem", "kmem_cache_alloc_node");
    assert_eq!(cache_node.offset_of("node", 4).unwrap(), 44);
    for kernel in ["6.1", "6.12", "6.18"] {
        let dir = Path::new(FIXTURES).join(kernel).join("events/kmem");
        assert!(!dir.join("kmalloc_node").exists(), "{kernel}");
        assert!(!dir.join("kmem_cache_alloc_node").exists(), "{kernel}");
    }
}

#[test]
fn gfp_flags_per_kernel() {
    for e in &EXPECTED {
        for event in ["kmalloc", "kmem_cache_alloc"] {
            let f = fixture(e.kernel, "kmem", event);
            let what = format!("{} {event}", e.kernel);
            assert_eq!(f.print_flag("__GFP_ACCOUNT"), e.gfp_account, "{what}");
            assert_eq!(
                f.print_flag("__GFP_RECLAIMABLE"),
                e.gfp_reclaimable,
                "{what}"
            );
            assert_eq!(f.print_flag("__GFP_DMA"), e.gfp_dma, "{what}");
            // Bit 0 is always printed under the GFP_DMA alias.
            assert_eq!(f.print_flag("GFP_DMA"), Some(1), "{what}");
            // __GFP_RECLAIM | __GFP_IO | __GFP_FS = 0x400 | 0x800 | 0x40 | 0x80.
            assert_eq!(f.print_flag("GFP_KERNEL"), Some(0xcc0), "{what}");
            assert_eq!(
                f.print_flag("GFP_KERNEL_ACCOUNT"),
                Some(0x40_0cc0),
                "{what}"
            );
            assert_eq!(f.print_flag("NO_SUCH_FLAG"), None, "{what}");
        }
    }
}

#[test]
fn every_flag_table_entry_evaluates() {
    // The only entry without a value is the `{ 0, ((void *)0) }` terminator, which has no
    // name either; so every named entry of every table must come out.
    for (kernel, system, event, text) in all_fixtures() {
        let f = EventFormat::parse(&system, &event, &text).unwrap();
        let names = f.print_fmt.matches("}, {").count() + 1;
        let flags = f.print_flags();
        if f.print_fmt.contains("__print_flags") {
            let expected = if f.print_fmt.contains("((void *)0) }") {
                names - 1
            } else {
                names
            };
            assert_eq!(flags.len(), expected, "{kernel} {system}/{event}");
        } else {
            assert!(flags.is_empty());
        }
    }
}

#[test]
fn transhuge_light_masks_out_reclaim() {
    // GFP_TRANSHUGE_LIGHT = (HIGHUSER_MOVABLE | COMP | NOMEMALLOC | NOWARN) & ~RECLAIM;
    // it exercises `~` on a 32-bit gfp_t inside a 64-bit result.
    // 5.10/6.1: HIGHUSER_MOVABLE = 0x400|0x800|0x40|0x80|0x100000|0x02|0x08 = 0x100cca,
    // COMP 0x40000, NOMEMALLOC 0x80000, NOWARN 0x2000.
    let old = (0x10_0cca | 0x4_0000 | 0x8_0000 | 0x2000) & !0xc00u64;
    for kernel in ["5.10", "6.1", "6.12", "6.18"] {
        let f = fixture(kernel, "kmem", "kmalloc");
        // 6.12+ add __GFP_SKIP_KASAN to HIGHUSER_MOVABLE, which is 0 without KASAN_HW_TAGS.
        assert_eq!(f.print_flag("GFP_TRANSHUGE_LIGHT"), Some(old), "{kernel}");
        assert_eq!(f.print_flag("GFP_TRANSHUGE"), Some(old | 0x400), "{kernel}");
    }
}

#[test]
fn cgroup_events_per_kernel() {
    for kernel in KERNELS {
        for event in ["cgroup_mkdir", "cgroup_rmdir", "cgroup_release"] {
            let f = fixture(kernel, "cgroup", event);
            let what = format!("{kernel} {event}");
            assert_eq!(f.offset_of("root", 4).unwrap(), 8, "{what}");
            assert_eq!(f.offset_of("level", 4).unwrap(), 12, "{what}");
            assert_eq!(f.offset_of("id", 8).unwrap(), 16, "{what}");
            assert_eq!(f.offset_of("path", 4).unwrap(), 24, "{what}");
            let path = f.field("path").unwrap();
            assert!(path.data_loc && !path.rel_loc, "{what}");
            assert_eq!(f.field("id").unwrap().c_type, "u64");
            assert!(f.print_flags().is_empty());
        }
    }
}

#[test]
fn common_fields_and_header() {
    let f = fixture("6.18", "kmem", "kmalloc");
    assert_eq!(
        (f.system.as_str(), f.name.as_str(), f.id),
        ("kmem", "kmalloc", 658)
    );
    let names: Vec<&str> = f.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "common_type",
            "common_flags",
            "common_preempt_count",
            "common_pid",
            "call_site",
            "ptr",
            "bytes_req",
            "bytes_alloc",
            "gfp_flags",
            "node"
        ]
    );
    let pid = f.field("common_pid").unwrap();
    assert_eq!(
        (pid.offset, pid.size, pid.signed, pid.c_type.as_str()),
        (4, 4, true, "int")
    );
    assert_eq!(f.field("ptr").unwrap().c_type, "const void *");
    assert!(f.print_fmt.starts_with("\"call_site=%pS ptr=%p"));
}

const MINIMAL: &str = "name: ev\nID: 7\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n";

fn with_field(line: &str) -> String {
    format!("{MINIMAL}\t{line}\n\nprint fmt: \"\"\n")
}

#[test]
fn arrays_and_dynamic_fields() {
    let text = [
        "field:char comm[16];\toffset:8;\tsize:16;\tsigned:0;",
        "field:u8 grid[2][4];\toffset:24;\tsize:8;\tsigned:0;",
        "field:__rel_loc char[] msg;\toffset:32;\tsize:4;\tsigned:0;",
        "field:__data_loc unsigned long[] mask;\toffset:36;\tsize:4;\tsigned:0;",
    ]
    .iter()
    .fold(MINIMAL.to_string(), |acc, l| format!("{acc}\t{l}\n"));
    let f = EventFormat::parse("sys", "ev", &text).unwrap();
    let comm = f.field("comm").unwrap();
    assert_eq!(
        (comm.c_type.as_str(), comm.size, comm.data_loc),
        ("char[16]", 16, false)
    );
    assert_eq!(f.field("grid").unwrap().c_type, "u8[2][4]");
    let msg = f.field("msg").unwrap();
    assert!(msg.data_loc && msg.rel_loc);
    assert_eq!((msg.c_type.as_str(), msg.offset), ("char[]", 32));
    let mask = f.field("mask").unwrap();
    assert!(mask.data_loc && !mask.rel_loc);
    assert_eq!(mask.c_type, "unsigned long[]");
    assert_eq!(f.data_loc_offset("mask").unwrap(), 36);
    for not_data_loc in ["msg", "comm"] {
        let err = f.data_loc_offset(not_data_loc).unwrap_err();
        assert!(matches!(err, FormatError::NotDataLoc { .. }), "{err}");
        assert!(err.to_string().contains(not_data_loc), "{err}");
    }
    assert!(matches!(
        f.data_loc_offset("nope"),
        Err(FormatError::MissingField { .. })
    ));
}

#[test]
fn either_gfp_size_is_accepted_where_asked() {
    let f = fixture("5.10", "kmem", "kmalloc");
    let gfp = f.field("gfp_flags").unwrap();
    assert_eq!(f.offset_of_any("gfp_flags", &[4, 8]).unwrap(), gfp.offset);
    let err = f
        .offset_of_any("gfp_flags", &[2, 8])
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected 2 or 8"), "{err}");
}

#[test]
fn missing_offset_is_an_error_naming_the_field() {
    let err = EventFormat::parse("sys", "ev", &with_field("field:int x;\tsize:4;\tsigned:1;"))
        .unwrap_err();
    assert!(
        matches!(err, FormatError::BadLine { line: 5, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("sys/ev") && msg.contains("int x") && msg.contains("offset"),
        "{msg}"
    );
}

#[test]
fn bad_numbers_and_declarations_are_errors() {
    for line in [
        "field:int x;\toffset:eight;\tsize:4;\tsigned:1;",
        "field:int x;\toffset:70000;\tsize:4;\tsigned:1;",
        "field:int x;\toffset:-1;\tsize:4;\tsigned:1;",
        "field:int x;\toffset:8;\tsize:4;\tsigned:2;",
        "field:int x;\toffset:8;\tsize;\tsigned:1;",
        "field:int x;\toffset:8;",
        "field:x;\toffset:8;\tsize:4;\tsigned:1;",
        "field:int 9x;\toffset:8;\tsize:4;\tsigned:1;",
        "field:int[4];\toffset:8;\tsize:4;\tsigned:1;",
        "field:;\toffset:8;\tsize:4;\tsigned:1;",
    ] {
        let err = EventFormat::parse("sys", "ev", &with_field(line));
        assert!(
            matches!(err, Err(FormatError::BadLine { .. })),
            "{line}: {err:?}"
        );
    }
}

#[test]
fn garbage_is_rejected() {
    let cases = [
        ("", "MissingId"),
        ("hello world\n\x01\x02", "MissingId"),
        ("ID: 5\nformat:\n", "NoFields"),
        ("ID: five\n", "BadLine"),
        ("name: other\nID: 1\n", "NameMismatch"),
        ("<html><body>404</body></html>", "MissingId"),
    ];
    for (text, kind) in cases {
        let err = EventFormat::parse("sys", "ev", text).unwrap_err();
        assert!(format!("{err:?}").starts_with(kind), "{text:?}: {err:?}");
        assert!(err.to_string().contains("sys/ev"), "{err}");
    }
}

#[test]
fn offset_of_errors_name_event_and_field() {
    let f = fixture("5.10", "kmem", "kmalloc");
    let size = f.offset_of("gfp_flags", 8).unwrap_err();
    assert!(matches!(
        &size,
        FormatError::FieldSize {
            expected,
            actual: 4,
            ..
        } if expected == "8"
    ));
    let msg = size.to_string();
    assert!(
        msg.contains("kmem/kmalloc") && msg.contains("gfp_flags"),
        "{msg}"
    );
    let missing = f.offset_of("node", 4).unwrap_err().to_string();
    assert!(
        missing.contains("kmem/kmalloc") && missing.contains("`node`"),
        "{missing}"
    );
    assert!(
        missing.contains("bytes_alloc"),
        "lists available fields: {missing}"
    );
}

#[test]
fn expression_evaluator() {
    let cases: &[(&str, Option<u64>)] = &[
        (
            "( unsigned long)(( gfp_t)((((1UL))) << (22)))",
            Some(0x40_0000),
        ),
        ("(unsigned long)(( gfp_t)0x400000u)", Some(0x40_0000)),
        ("(__force gfp_t)0x10u", Some(0x10)),
        (
            "(unsigned long)((( gfp_t)(0x400u|0x800u)) | (( gfp_t)0x40u))",
            Some(0xc40),
        ),
        ("0x0f & 0x3c", Some(0xc)),
        ("1 | 2 & 3", Some(3)),
        ("(1 | 2) & 1", Some(1)),
        ("1 + 2 * 3", Some(7)),
        ("1 << 2 + 1", Some(8)),
        ("0x100 >> 4", Some(0x10)),
        ("5 ^ 1", Some(4)),
        ("010", Some(8)),
        ("0", Some(0)),
        ("12345", Some(12345)),
        ("1ULL << 63", Some(1 << 63)),
        ("1lu", Some(1)),
        ("0XFFu", Some(255)),
        // `~` and negative values follow C's widths and sign extension.
        ("~(( gfp_t)0)", Some(0xffff_ffff)),
        ("(unsigned long)~0", Some(u64::MAX)),
        ("~0u", Some(0xffff_ffff)),
        ("~0UL", Some(u64::MAX)),
        ("-1", Some(u64::MAX)),
        ("(unsigned int)-1", Some(0xffff_ffff)),
        ("0xffffffff", Some(0xffff_ffff)),
        ("(long)0xffffffff", Some(0xffff_ffff)),
        ("(int)0xffffffff", Some(u64::MAX)),
        ("~0x7fffffff", Some(0xffff_ffff_8000_0000)),
        ("~0x80000000", Some(0x7fff_ffff)),
        ("0x00000001u & ~(( gfp_t)0x0u)", Some(1)),
        ("-8 >> 1", Some((-4i64) as u64)),
        // Not evaluable: give nothing rather than something.
        ("", None),
        ("REC->gfp_flags", None),
        ("((void *)0)", None),
        ("(struct foo)1", None),
        ("1 << 32", None),
        ("1UL << 64", None),
        ("1 << -1", None),
        ("08", None),
        ("0x", None),
        ("1LUL", None),
        ("1.5", None),
        ("1 +", None),
        ("(1", None),
        ("1)", None),
        ("()", None),
        ("1 2", None),
        ("1 || 2", None),
        ("1 / 1", None),
        ("sizeof(int)", None),
        ("0xFFFFFFFFFFFFFFFFFF", None),
        ("99999999999999999999", None),
        ("9223372036854775808", None),
        ("\"1\"", None),
    ];
    for (expr, expected) in cases {
        assert_eq!(cexpr::eval(expr), *expected, "{expr}");
    }
    assert_eq!(
        cexpr::eval(&format!("{}1{}", "(".repeat(100), ")".repeat(100))),
        Some(1)
    );
    assert_eq!(
        cexpr::eval(&format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000))),
        None
    );
    assert_eq!(cexpr::eval(&"~".repeat(100_000)), None);
    assert_eq!(cexpr::eval(&"(int)".repeat(100_000)), None);
}

#[test]
fn flag_tables_are_scanned_robustly() {
    let f = |fmt: &str| EventFormat {
        system: "s".into(),
        name: "e".into(),
        id: 1,
        fields: Vec::new(),
        print_fmt: fmt.into(),
    };
    let two_tables = f(
        r#""%s %s", __print_flags(REC->a, "|", {1, "A"}, {2, "B"}), __print_flags_u64(REC->b, "|", {4, "C"}, {8, "A"})"#,
    );
    assert_eq!(two_tables.print_flag("B"), Some(2));
    assert_eq!(two_tables.print_flag("C"), Some(4));
    assert_eq!(two_tables.print_flag("A"), None, "conflicting values");
    let same_twice = f(r#"__print_flags(x, "|", {1, "A"}), __print_flags(y, "|", {1, "A"})"#);
    assert_eq!(same_twice.print_flag("A"), Some(1));
    let in_string = f(r#""__print_flags(x, \"|\", {1, \"A\"})", REC->x"#);
    assert!(in_string.print_flags().is_empty());
    let tricky = f(
        r#"__print_flags(REC->f, ",", {(1), "A,B"}, {REC->x, "D"}, {1, N}, {0x2, "E"}, { 0, ((void *)0) })"#,
    );
    assert_eq!(
        tricky.print_flags(),
        [("A,B".to_string(), 1), ("E".to_string(), 2)]
    );
    assert!(f(r#"__print_flags(REC->f, "|", {1, "A"}"#)
        .print_flags()
        .is_empty());
    assert!(f(r#"__print_flags  "#).print_flags().is_empty());
    assert!(f("\"unterminated").print_flags().is_empty());
}

/// Cheap deterministic PRNG so the garbling test needs no extra crates and never flakes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound.max(1) as u64) as usize
    }
}

fn garble(text: &str, rng: &mut XorShift) -> String {
    const NOISE: &[u8] = b"(){}[]\",;:<>~|&^0123456789xXuUlL \t\n-+*_aZ\\'";
    let mut bytes = text.as_bytes().to_vec();
    for _ in 0..=rng.next(4) {
        let at = rng.next(bytes.len() + 1);
        let len = rng.next(16).min(bytes.len() - at);
        match rng.next(4) {
            0 => {
                bytes.drain(at..at + len);
            }
            1 => {
                let copy = bytes[at..at + len].to_vec();
                bytes.splice(at..at, copy);
            }
            2 => {
                for b in &mut bytes[at..at + len] {
                    *b = NOISE[rng.next(NOISE.len())];
                }
            }
            _ => bytes.insert(at, NOISE[rng.next(NOISE.len())]),
        }
    }
    String::from_utf8(bytes).expect("fixtures and noise are ASCII")
}

fn exercise(system: &str, event: &str, text: &str) {
    if let Ok(f) = EventFormat::parse(system, event, text) {
        let _ = f.print_flags();
        let _ = f.print_flag("__GFP_ACCOUNT");
        let _ = f.offset_of("ptr", 8);
        let _ = f.field("name");
    }
}

#[test]
fn truncated_and_garbled_fixtures_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for (_, system, event, text) in all_fixtures() {
        assert!(text.is_ascii());
        // Every truncation of the header and fields, then a sample of the long print fmt.
        let fmt_start = text.find("print fmt").unwrap_or(text.len());
        for cut in (0..fmt_start).chain((fmt_start..=text.len()).step_by(17)) {
            exercise(&system, &event, &text[..cut]);
        }
        for _ in 0..300 {
            exercise(&system, &event, &garble(&text, &mut rng));
        }
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracefs-test-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn reads_events_from_a_tracefs_layout() {
    // Each fixture kernel directory is laid out like a tracefs root.
    let dir = Path::new(FIXTURES).join("6.18");
    let t = Tracefs::at(&dir);
    assert_eq!(t.root(), dir.as_path());
    assert!(t.has_event("kmem", "kmalloc"));
    assert!(!t.has_event("kmem", "kmalloc_node"));
    let f = t.event_format("kmem", "kmem_cache_alloc").unwrap().unwrap();
    assert_eq!(f.offset_of("bytes_alloc", 8).unwrap(), 40);
    assert!(t.event_format("kmem", "kmalloc_node").unwrap().is_none());
    assert!(t.event_format("nosys", "kmalloc").unwrap().is_none());
    for (system, name) in [
        ("..", "x"),
        ("kmem", "../kmem/kmalloc"),
        ("", "x"),
        ("kmem", ""),
    ] {
        assert!(!t.has_event(system, name));
        let err = t.event_format(system, name).unwrap_err();
        assert!(matches!(err, FormatError::InvalidName { .. }), "{err:?}");
    }
}

#[test]
fn unreadable_format_is_an_io_error_not_absence() {
    let dir = scratch_dir("io");
    // A directory where the file should be makes read_to_string fail without needing
    // permissions (tests may run as root).
    fs::create_dir_all(dir.join("events/kmem/kmalloc/format")).unwrap();
    let err = Tracefs::at(&dir)
        .event_format("kmem", "kmalloc")
        .unwrap_err();
    assert!(matches!(err, FormatError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("kmem/kmalloc/format"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn finds_tracefs_mount_points() {
    let mounts = "sysfs /sys sysfs rw 0 0\n\
                  tracefs /sys/kernel/tracing tracefs rw,nosuid 0 0\n\
                  none /mnt/my\\040trace tracefs rw 0 0\n\
                  debugfs /sys/kernel/debug debugfs rw 0 0\n\
                  garbage\n";
    assert_eq!(
        tracefs_mount_points(mounts),
        [
            PathBuf::from("/sys/kernel/tracing"),
            PathBuf::from("/mnt/my trace")
        ]
    );
    assert_eq!(unescape_mount_path(r"a\134b\011c\9"), "a\\b\tc\\9");
    assert_eq!(unescape_mount_path(r"end\04"), r"end\04");
}

#[test]
fn locate_skips_directories_without_events() {
    let dir = scratch_dir("locate");
    let (empty, real) = (dir.join("empty"), dir.join("real"));
    fs::create_dir_all(&empty).unwrap();
    fs::create_dir_all(real.join("events")).unwrap();
    let missing = dir.join("missing");
    assert_eq!(
        locate(&[missing.clone(), empty.clone(), real.clone()]).unwrap(),
        Some(real)
    );
    assert_eq!(locate(&[missing, empty]).unwrap(), None);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn find_mounted_looks_where_locate_does_under_a_root() {
    let dir = scratch_dir("find-mounted");
    // An unmounted mount point is an empty directory.
    fs::create_dir_all(dir.join("sys/kernel/tracing")).unwrap();
    assert_eq!(find_mounted(&dir).unwrap(), None);
    fs::create_dir_all(dir.join("sys/kernel/debug/tracing/events")).unwrap();
    assert_eq!(
        find_mounted(&dir).unwrap(),
        Some("/sys/kernel/debug/tracing")
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// Runs against the live kernel when it can: the point is that the real path works, but
/// CI machines without tracefs (or without root) must not fail for it.
#[test]
fn live_kernel_when_available() {
    let t = match Tracefs::locate_or_mount() {
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("mount -t tracefs") || msg.contains("root"),
                "{msg}"
            );
            eprintln!("skipping live check: {msg}");
            return;
        }
    };
    let Ok(Some(kmalloc)) = t.event_format("kmem", "kmalloc") else {
        eprintln!(
            "skipping live check: kmem:kmalloc not readable under {}",
            t.root().display()
        );
        return;
    };
    assert!(kmalloc.offset_of("ptr", 8).is_ok());
    assert!(kmalloc.field("gfp_flags").is_some());
    // The value moved between 4.x and 5.x; any kernel we support has it in the table.
    assert!(kmalloc.print_flag("__GFP_ACCOUNT").is_some());
    assert!(t
        .event_format("kmem", "no_such_event_here")
        .unwrap()
        .is_none());
}

use crate::test_rng::Rng;

/// What a garbled format file tends to contain: C punctuation, digits,
/// the keys the parser looks for, and bytes that are not text at all.
const PIECES: [&str; 24] = [
    "(",
    ")",
    "{",
    "}",
    ",",
    "\"",
    ";",
    "<<",
    ">>",
    "|",
    "&",
    "~",
    "-",
    "0x",
    "9",
    "18446744073709551615",
    "(unsigned long)",
    "offset:",
    "size:",
    "signed:",
    "field:",
    "\u{0}",
    "\u{fffd}",
    "\n",
];

fn corrupt(rng: &mut Rng, text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    // Aim half of the edits at print fmt, where the expression evaluator runs.
    let fmt_at = text.find("print fmt:").unwrap_or(0);
    for _ in 0..1 + rng.below(6) {
        let at = if rng.below(2) == 0 {
            fmt_at + rng.below(bytes.len().saturating_sub(fmt_at))
        } else {
            rng.below(bytes.len())
        }
        .min(bytes.len());
        match rng.below(5) {
            0 if at < bytes.len() => bytes[at] = rng.next() as u8,
            1 => {
                let piece = PIECES[rng.below(PIECES.len())];
                bytes.splice(at..at, piece.bytes());
            }
            2 => {
                let end = (at + 1 + rng.below(40)).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(200)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                let to = rng.below(bytes.len());
                bytes.splice(to..to, copy);
            }
            _ => bytes.truncate(at),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn field_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| strip_field_prefix(l).is_some())
        .collect()
}

/// Randomly corrupted and truncated copies of every real format file:
/// parsing, field lookups and the flag tables give errors or answers, never
/// a panic; and a layout comes only from the field lines, so where those
/// survived intact the fields are exactly the real ones.
#[test]
fn corrupted_formats_error_and_never_panic_or_misplace_a_field() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut parsed, mut intact) = (0, 0);
    for (kernel, system, event, text) in all_fixtures() {
        let good = EventFormat::parse(&system, &event, &text).expect("real fixture");
        for round in 0..300 {
            let bad = corrupt(&mut rng, &text);
            let Ok(fmt) = EventFormat::parse(&system, &event, &bad) else {
                continue;
            };
            parsed += 1;
            for f in &good.fields {
                let _ = fmt.offset_of(&f.name, f.size);
            }
            let flags = fmt.print_flags();
            for (name, _) in flags.iter().take(8) {
                let _ = fmt.print_flag(name);
            }
            if field_lines(&bad) == field_lines(&text) {
                intact += 1;
                assert_eq!(
                    fmt.fields, good.fields,
                    "{kernel} {system}/{event} round {round}: a layout not from its field lines"
                );
            }
        }
    }
    assert!(
        parsed > 1000,
        "too few corrupted formats parsed ({parsed}) to exercise lookups"
    );
    assert!(
        intact > 500,
        "too few with intact field lines ({intact}) to check layouts"
    );
}

/// The evaluator on garbage: random token soup, real table entries with
/// bytes changed, absurd shifts and nesting: a value or None, never a panic.
#[test]
fn the_expression_evaluator_survives_garbage() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let tokens = [
        "(",
        ")",
        "(unsigned long)",
        "(int)",
        "(unsigned int)",
        "(long)",
        "(gfp_t)",
        "~",
        "-",
        "<<",
        ">>",
        "|",
        "&",
        "^",
        "*",
        "+",
        "0",
        "1",
        "63",
        "64",
        "4294967295",
        "0xffffffffffffffff",
        "99999999999999999999999",
        "(( gfp_t)",
        "1u",
        "1ul",
        "x",
    ];
    let mut real = Vec::new();
    for (_, _, _, text) in all_fixtures() {
        let fmt = text
            .split("print fmt:")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        for args in print_flag_calls(&fmt) {
            real.extend(
                split_top_level(args)
                    .unwrap_or_default()
                    .iter()
                    .map(|a| a.to_string()),
            );
        }
    }
    assert!(!real.is_empty(), "no flag tables in the fixtures");
    for _ in 0..20_000 {
        let n = 1 + rng.below(12);
        let soup: Vec<&str> = (0..n).map(|_| tokens[rng.below(tokens.len())]).collect();
        let _ = cexpr::eval(&soup.join(" "));
        let mut entry = real[rng.below(real.len())].clone().into_bytes();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(entry.len());
            if at < entry.len() {
                entry[at] = tokens[rng.below(tokens.len())].as_bytes()[0];
            }
        }
        let entry = String::from_utf8_lossy(&entry);
        let _ = flag_entry(&entry);
        let _ = cexpr::eval(&entry);
    }
    for expr in [
        "1 << 64",
        "1 << 18446744073709551615",
        "-9223372036854775808 * -1",
        "~0 >> 999",
    ] {
        let _ = cexpr::eval(expr);
    }
    let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
    assert_eq!(cexpr::eval(&deep), None, "nesting is bounded");
    let casts = format!("{}1", "(unsigned long)".repeat(100_000));
    let _ = cexpr::eval(&casts);
}
