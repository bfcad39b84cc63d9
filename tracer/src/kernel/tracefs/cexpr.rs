//! A tiny evaluator for the integer constant expressions the kernel's preprocessor leaves in
//! print fmt tables: literals, casts, `~ - +`, `* + - << >> & ^ |` and parentheses. It follows
//! C's typing rules for an LP64 kernel (int is 32 bits, long 64) because `~` and shifts give
//! different answers at different widths; whatever it does not understand yields `None`.

/// Far deeper than real tables nest (a few dozen levels of parentheses and casts), shallow
/// enough that a garbled format cannot overflow the stack.
const MAX_DEPTH: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ty {
    bits: u32,
    signed: bool,
}

const INT: Ty = Ty::new(32, true);
const UINT: Ty = Ty::new(32, false);
const LONG: Ty = Ty::new(64, true);
const ULONG: Ty = Ty::new(64, false);

impl Ty {
    const fn new(bits: u32, signed: bool) -> Ty {
        Ty { bits, signed }
    }
}

/// A value of type `ty`, stored as its two's-complement bits zero-extended to 64.
#[derive(Clone, Copy, Debug)]
struct Val {
    raw: u64,
    ty: Ty,
}

impl Val {
    fn new(raw: u64, ty: Ty) -> Val {
        let mask = if ty.bits >= 64 {
            u64::MAX
        } else {
            (1u64 << ty.bits) - 1
        };
        Val {
            raw: raw & mask,
            ty,
        }
    }

    /// C conversion: sign-extend from a narrower signed type, then truncate.
    fn convert(self, ty: Ty) -> Val {
        let negative =
            self.ty.signed && self.ty.bits < 64 && (self.raw >> (self.ty.bits - 1)) & 1 == 1;
        let extended = if negative {
            self.raw | (u64::MAX << self.ty.bits)
        } else {
            self.raw
        };
        Val::new(extended, ty)
    }

    fn as_i64(self) -> i64 {
        self.convert(LONG).raw as i64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Mul,
    Add,
    Sub,
    Shl,
    Shr,
    And,
    Xor,
    Or,
    Not,
}

#[derive(Clone, Copy, Debug)]
enum Tok<'a> {
    Num(Val),
    Ident(&'a str),
    Open,
    Close,
    Op(Op),
}

/// Value of `expr` converted to `unsigned long`, as the kernel's flag tables store it.
pub(super) fn eval(expr: &str) -> Option<u64> {
    let tokens = tokenize(expr)?;
    let mut parser = Parser { tokens, pos: 0 };
    let value = parser.binary(0, 0)?;
    if parser.pos != parser.tokens.len() {
        return None;
    }
    Some(value.convert(ULONG).raw)
}

fn tokenize(expr: &str) -> Option<Vec<Tok<'_>>> {
    let bytes = expr.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let word_end = |from: usize| {
            (from..bytes.len())
                .find(|&j| !super::is_ident_char(bytes[j] as char))
                .unwrap_or(bytes.len())
        };
        let (tok, next) = match b {
            _ if b.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'0'..=b'9' => {
                let end = word_end(i);
                (Tok::Num(literal(&expr[i..end])?), end)
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                let end = word_end(i);
                (Tok::Ident(&expr[i..end]), end)
            }
            b'(' => (Tok::Open, i + 1),
            b')' => (Tok::Close, i + 1),
            b'~' => (Tok::Op(Op::Not), i + 1),
            b'*' => (Tok::Op(Op::Mul), i + 1),
            b'+' => (Tok::Op(Op::Add), i + 1),
            b'-' => (Tok::Op(Op::Sub), i + 1),
            b'&' => (Tok::Op(Op::And), i + 1),
            b'^' => (Tok::Op(Op::Xor), i + 1),
            b'|' => (Tok::Op(Op::Or), i + 1),
            b'<' if bytes.get(i + 1) == Some(&b'<') => (Tok::Op(Op::Shl), i + 2),
            b'>' if bytes.get(i + 1) == Some(&b'>') => (Tok::Op(Op::Shr), i + 2),
            _ => return None,
        };
        tokens.push(tok);
        i = next;
    }
    Some(tokens)
}

/// An integer literal with C's typing: the first of the allowed types that holds it.
fn literal(text: &str) -> Option<Val> {
    let body_len = text.find(['u', 'U', 'l', 'L']).unwrap_or(text.len());
    let (body, suffix) = text.split_at(body_len);
    let (unsigned, long) = literal_suffix(suffix)?;
    let (digits, radix) =
        if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            (hex, 16)
        } else if body.len() > 1 && body.starts_with('0') {
            (&body[1..], 8)
        } else {
            (body, 10)
        };
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    let value = u64::from_str_radix(digits, radix).ok()?;
    let candidates: &[Ty] = match (radix == 10, unsigned) {
        (true, false) => &[INT, LONG],
        (_, true) => &[UINT, ULONG],
        (false, false) => &[INT, UINT, LONG, ULONG],
    };
    let ty = candidates
        .iter()
        .filter(|ty| !long || ty.bits == 64)
        .find(|ty| fits(value, **ty))?;
    Some(Val::new(value, *ty))
}

/// (unsigned, long) for a literal suffix such as `UL`, `ull`, `LU`; `None` if malformed.
fn literal_suffix(suffix: &str) -> Option<(bool, bool)> {
    match suffix.to_ascii_lowercase().as_str() {
        "" => Some((false, false)),
        "u" => Some((true, false)),
        "l" | "ll" => Some((false, true)),
        "ul" | "lu" | "ull" | "llu" => Some((true, true)),
        _ => None,
    }
}

fn fits(value: u64, ty: Ty) -> bool {
    let max_bits = if ty.signed { ty.bits - 1 } else { ty.bits };
    max_bits >= 64 || value < (1u64 << max_bits)
}

/// Cast targets, written the way print fmt spells them. `gfp_t` is `unsigned int` on every
/// kernel; `long` is 64-bit because tracefs formats are read from the running LP64 kernel.
fn cast_type(words: &[&str]) -> Option<Ty> {
    let words: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !matches!(*w, "__force" | "const" | "volatile" | "__bitwise"))
        .collect();
    Some(match words.join(" ").as_str() {
        "gfp_t" | "unsigned" | "unsigned int" | "u32" | "__u32" | "uint32_t" => UINT,
        "int" | "signed" | "signed int" | "s32" | "__s32" | "int32_t" => INT,
        "unsigned long"
        | "unsigned long int"
        | "long unsigned int"
        | "unsigned long long"
        | "unsigned long long int"
        | "long long unsigned int"
        | "u64"
        | "__u64"
        | "uint64_t"
        | "size_t" => ULONG,
        "long" | "long int" | "signed long" | "long long" | "long long int"
        | "signed long long" | "s64" | "__s64" | "int64_t" | "ssize_t" => LONG,
        _ => return None,
    })
}

/// Usual arithmetic conversions for types no narrower than int: the wider type wins, and
/// at equal width unsigned wins.
fn common(a: Ty, b: Ty) -> Ty {
    match a.bits.cmp(&b.bits) {
        std::cmp::Ordering::Greater => a,
        std::cmp::Ordering::Less => b,
        std::cmp::Ordering::Equal => Ty {
            bits: a.bits,
            signed: a.signed && b.signed,
        },
    }
}

fn precedence(op: Op) -> Option<usize> {
    Some(match op {
        Op::Mul => 6,
        Op::Add | Op::Sub => 5,
        Op::Shl | Op::Shr => 4,
        Op::And => 3,
        Op::Xor => 2,
        Op::Or => 1,
        Op::Not => return None,
    })
}

fn apply(op: Op, lhs: Val, rhs: Val) -> Option<Val> {
    if matches!(op, Op::Shl | Op::Shr) {
        return shift(op, lhs, rhs);
    }
    let ty = common(lhs.ty, rhs.ty);
    let (a, b) = (lhs.convert(ty).raw, rhs.convert(ty).raw);
    let raw = match op {
        Op::Mul => a.wrapping_mul(b),
        Op::Add => a.wrapping_add(b),
        Op::Sub => a.wrapping_sub(b),
        Op::And => a & b,
        Op::Xor => a ^ b,
        Op::Or => a | b,
        Op::Shl | Op::Shr | Op::Not => return None,
    };
    Some(Val::new(raw, ty))
}

/// Shifts keep the left operand's type; counts that are negative or not below its width
/// are undefined in C, so they give no value rather than some value.
fn shift(op: Op, lhs: Val, rhs: Val) -> Option<Val> {
    let count = u32::try_from(rhs.as_i64())
        .ok()
        .filter(|c| *c < lhs.ty.bits)?;
    let raw = match op {
        Op::Shl => lhs.raw << count,
        _ if lhs.ty.signed => (lhs.as_i64() >> count) as u64,
        _ => lhs.raw >> count,
    };
    Some(Val::new(raw, lhs.ty))
}

struct Parser<'a> {
    tokens: Vec<Tok<'a>>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Tok<'a>> {
        self.tokens.get(self.pos).copied()
    }

    /// Precedence climbing over the left-associative binary operators.
    fn binary(&mut self, min_prec: usize, depth: usize) -> Option<Val> {
        let mut lhs = self.unary(depth + 1)?;
        while let Some(Tok::Op(op)) = self.peek() {
            let Some(prec) = precedence(op).filter(|p| *p >= min_prec) else {
                break;
            };
            self.pos += 1;
            let rhs = self.binary(prec + 1, depth + 1)?;
            lhs = apply(op, lhs, rhs)?;
        }
        Some(lhs)
    }

    fn unary(&mut self, depth: usize) -> Option<Val> {
        if depth > MAX_DEPTH {
            return None;
        }
        let tok = self.peek()?;
        self.pos += 1;
        match tok {
            Tok::Num(value) => Some(value),
            Tok::Op(Op::Not) => {
                let v = self.unary(depth + 1)?;
                Some(Val::new(!v.raw, v.ty))
            }
            Tok::Op(Op::Sub) => {
                let v = self.unary(depth + 1)?;
                Some(Val::new(v.raw.wrapping_neg(), v.ty))
            }
            Tok::Op(Op::Add) => self.unary(depth + 1),
            Tok::Open => match self.cast_words() {
                Some(words) => {
                    let ty = cast_type(&words)?;
                    Some(self.unary(depth + 1)?.convert(ty))
                }
                None => {
                    let v = self.binary(0, depth + 1)?;
                    if !matches!(self.peek(), Some(Tok::Close)) {
                        return None;
                    }
                    self.pos += 1;
                    Some(v)
                }
            },
            Tok::Ident(_) | Tok::Close | Tok::Op(_) => None,
        }
    }

    /// After an opening parenthesis: if only identifiers follow up to the closing one, this
    /// is a cast; consume it and return the words. Otherwise leave the position alone.
    fn cast_words(&mut self) -> Option<Vec<&'a str>> {
        let mut words = Vec::new();
        let mut i = self.pos;
        while let Some(Tok::Ident(word)) = self.tokens.get(i) {
            words.push(*word);
            i += 1;
        }
        if words.is_empty() || !matches!(self.tokens.get(i), Some(Tok::Close)) {
            return None;
        }
        self.pos = i + 1;
        Some(words)
    }
}
