//! A field-selective JSON reader for the admission path: a `serde::Deserializer` that reads what
//! the typed views ask for and skips everything else by its structure alone.
//!
//! Most of an AdmissionReview is what no policy reads: `managedFields`, probes, env, volume
//! mounts, resources, `status`, the review's `options`. serde_json checks what it skips token by
//! token (escapes, control characters, number syntax, commas and colons), and with the typed
//! reading that was more than half of the server's instructions per review. This reader
//! keeps serde's types and derives (the views, `k8s_openapi`'s `Toleration`, `Affinity`,
//! `OwnerReference`), so what a field means, which fields are required, null handling and
//! duplicate fields are decided by the same code as before; only the reading of bytes differs:
//!
//! - objects and arrays that a view reads are walked here, strictly (commas, colons, string
//!   keys, no trailing comma, nothing after the document but whitespace);
//! - the whole document is checked once as UTF-8 (JSON must be; serde_json did not check the
//!   strings it skipped, so a body with invalid UTF-8 in a skipped string, which no API server
//!   sends, is now refused where it was read); strings that a view reads are checked for
//!   control characters as serde_json checks them; a string with an escape, every number, `true`/`false`, enums and anything of an
//!   unexpected type are handed, as one value, to serde_json itself, so their reading and their
//!   errors are serde_json's;
//! - a value that no view reads (`IgnoredAny`) is skipped by structure: its end is found by
//!   matching brackets outside strings, and strings are crossed by a search for `"` and `\`.
//!
//! **What is not checked, and why that is acceptable.** Inside a skipped value, this reader
//! checks only that strings end and that brackets match by kind; it does not check UTF-8,
//! escape sequences, control characters, number or literal spelling, or the commas and colons
//! between skipped tokens. So a body that is not valid JSON *only inside fields no policy reads*
//! is read where serde_json refused it. That cannot change a decision: on valid JSON the
//! structure found is exactly serde_json's (brackets and quotes outside strings are structural),
//! so every value a policy reads is the same; the API server only sends JSON it has itself
//! encoded; and moat's answer never echoes a skipped byte (it names the uid, which is read and
//! checked, and reasons built from read fields). Everything outside skipped values (the
//! envelope, every field a policy reads, the document's own structure) is refused as before when
//! it is not valid JSON, and so is a skipped value whose strings or brackets do not close.
//! The tests in `tests/reader.rs` hold this reader against serde_json on every captured
//! review's objects and on mutated copies of them.

use std::fmt;

use serde::de::{self, DeserializeSeed, Visitor};

/// Why a body could not be read: serde_json's message (or a structural one), and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    /// Byte offset in the document, once known.
    offset: Option<usize>,
}

impl Error {
    fn at(message: impl Into<String>, offset: usize) -> Self {
        Self {
            message: message.into(),
            offset: Some(offset),
        }
    }

    /// serde_json's error on `span`, which starts at `start` in the document: its message
    /// without serde_json's position, which is relative to the span, and the document's offset.
    fn from_serde_json(e: &serde_json::Error, span: &[u8], start: usize) -> Self {
        let text = e.to_string();
        let message = match text.rfind(" at line ") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        // Line and column (1-based, in bytes) within the span, back to an offset.
        let mut offset = 0;
        for _ in 1..e.line() {
            offset += span[offset..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(span.len() - offset, |i| i + 1);
        }
        Self::at(message, start + (offset + e.column()).saturating_sub(1))
    }

    fn or_at(mut self, offset: usize) -> Self {
        self.offset.get_or_insert(offset);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(offset) => write!(f, "{} at byte {offset}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            message: msg.to_string(),
            offset: None,
        }
    }
}

/// Reads a value of type `T` from a whole JSON document.
///
/// # Errors
/// [`Error`] when the document is not JSON where it is read (see the module's notes on skipped
/// values), or a field read has the wrong type.
pub fn from_slice<'de, T: de::Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, Error> {
    from_slice_seed(bytes, std::marker::PhantomData::<T>)
}

/// [`from_slice`] with a seed.
///
/// # Errors
/// As [`from_slice`].
pub fn from_slice_seed<'de, S: DeserializeSeed<'de>>(
    bytes: &'de [u8],
    seed: S,
) -> Result<S::Value, Error> {
    let mut reader = Reader::new(bytes)?;
    let value = seed
        .deserialize(&mut reader)
        .map_err(|e| e.or_at(reader.pos))?;
    match reader.peek() {
        None => Ok(value),
        Some(_) => Err(Error::at("trailing characters", reader.pos)),
    }
}

/// The bytes of one JSON value, left unread to be read later (once the envelope has said what
/// they are). Only this module's reader produces it, through a private newtype name, as
/// serde_json does for its `RawValue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawJson<'de>(&'de [u8]);

impl<'de> RawJson<'de> {
    /// The value's bytes, as they stand in the document.
    pub fn get(&self) -> &'de [u8] {
        self.0
    }
}

const RAW_JSON_TOKEN: &str = "$moat::json::RawJson";

impl<'de> de::Deserialize<'de> for RawJson<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = RawJson<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value read by moat's reader")
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(RawJson(v))
            }
        }
        d.deserialize_newtype_struct(RAW_JSON_TOKEN, RawVisitor)
    }
}

/// The reader: a document and a position in it.
#[derive(Debug)]
pub struct Reader<'de> {
    input: &'de [u8],
    /// The same bytes, checked once as UTF-8 (as JSON must be).
    text: &'de str,
    pos: usize,
    /// The brackets open in the value being skipped; kept to reuse its allocation.
    open: Vec<u8>,
    /// How many more objects and arrays may nest in what is read (not skipped), as serde_json
    /// counts them.
    remaining_depth: u8,
}

/// serde_json's limit on nesting in what it reads.
const MAX_READ_DEPTH: u8 = 128;

/// serde_json's deserializer over one value's bytes.
type Json<'de> = serde_json::Deserializer<serde_json::de::SliceRead<'de>>;

impl<'de> Reader<'de> {
    /// A reader at the start of `input`.
    ///
    /// # Errors
    /// When `input` is not UTF-8.
    pub fn new(input: &'de [u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(input).map_err(|e| Error::at("invalid UTF-8", e.valid_up_to()))?;
        Ok(Self {
            input,
            text,
            pos: 0,
            open: Vec::new(),
            remaining_depth: MAX_READ_DEPTH,
        })
    }

    /// The next byte that is not JSON whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.input.get(self.pos) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    fn eof(&self) -> Error {
        Error::at("EOF while parsing a value", self.pos)
    }

    /// The string whose opening quote is at `self.pos`: where it ends (just past its closing
    /// quote) and what it holds. Only the quote and backslash decide where it ends; control
    /// characters are noted for strings that are read.
    fn scan_string(&self) -> Result<StringScan, Error> {
        let input = self.input;
        let mut i = self.pos + 1;
        let (mut escaped, mut control) = (false, 0u64);
        // Eight bytes at a time: the first quote or backslash, and any control character before
        // it (bit tricks from "Bit Twiddling Hacks": `haszero`, `hasless`).
        while let Some(chunk) = input.get(i..i + 8) {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            let w = u64::from_le_bytes(word);
            let stop = has_byte(w, b'"') | has_byte(w, b'\\');
            let less = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
            if stop == 0 {
                control |= less;
                i += 8;
                continue;
            }
            let n = stop.trailing_zeros() / 8;
            control |= less & ((1u64 << (n * 8)) - 1);
            i += n as usize;
            if input[i] == b'"' {
                return Ok(StringScan {
                    end: i + 1,
                    escaped,
                    control: control != 0,
                });
            }
            escaped = true;
            i += 2;
        }
        while let Some(&b) = input.get(i) {
            match b {
                b'"' => {
                    return Ok(StringScan {
                        end: i + 1,
                        escaped,
                        control: control != 0,
                    });
                }
                b'\\' => {
                    escaped = true;
                    i += 2;
                    continue;
                }
                0..0x20 => control = 1,
                _ => {}
            }
            i += 1;
        }
        Err(Error::at("EOF while parsing a string", input.len()))
    }

    /// Skips the value at `self.pos` (after whitespace) by its structure; see the module's notes
    /// for what is not checked. Returns where the value started.
    fn skip(&mut self) -> Result<usize, Error> {
        let start = match self.peek() {
            Some(b'{' | b'[') => {
                let start = self.pos;
                self.skip_nested()?;
                return Ok(start);
            }
            Some(b'"') => {
                let start = self.pos;
                self.pos = cross_string(self.input, start + 1)
                    .ok_or_else(|| Error::at("EOF while parsing a string", self.input.len()))?;
                return Ok(start);
            }
            Some(b'}' | b']' | b',' | b':') => {
                return Err(Error::at("expected value", self.pos));
            }
            Some(_) => self.pos,
            None => return Err(self.eof()),
        };
        // A number or a literal: up to the next delimiter.
        self.pos += self.input[self.pos..]
            .iter()
            .position(|&b| is_delimiter(b))
            .unwrap_or(self.input.len() - self.pos);
        Ok(start)
    }

    /// Skips an object or array: brackets matched by kind outside strings.
    fn skip_nested(&mut self) -> Result<(), Error> {
        self.open.clear();
        let input = self.input;
        let mut i = self.pos;
        while let Some(&b) = input.get(i) {
            i += 1;
            match b {
                b'"' => match cross_string(input, i) {
                    Some(end) => i = end,
                    None => return Err(Error::at("EOF while parsing a string", input.len())),
                },
                b'{' | b'[' => self.open.push(b),
                b'}' | b']' => {
                    let opened = if b == b'}' { b'{' } else { b'[' };
                    if self.open.pop() != Some(opened) {
                        return Err(Error::at("mismatched bracket", i - 1));
                    }
                    if self.open.is_empty() {
                        self.pos = i;
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        Err(Error::at("EOF while parsing a value", input.len()))
    }

    /// Reads one whole value with serde_json: found by [`Reader::skip`], then read by
    /// serde_json alone, so it is checked as serde_json checks it.
    fn delegate<T>(
        &mut self,
        read: impl FnOnce(&mut Json<'de>) -> Result<T, serde_json::Error>,
    ) -> Result<T, Error> {
        let start = self.skip()?;
        let span = &self.input[start..self.pos];
        let mut de = serde_json::Deserializer::from_slice(span);
        read(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|e| Error::from_serde_json(&e, span, start))
    }

    /// A string read without escapes: borrowed, after serde_json's checks (the document's UTF-8
    /// was checked once, whole). `None` when it has an escape (then serde_json reads it).
    fn plain_str(&mut self) -> Result<Option<&'de str>, Error> {
        let scan = self.scan_string()?;
        if scan.escaped {
            return Ok(None);
        }
        let (start, end) = (self.pos + 1, scan.end - 1);
        if scan.control {
            let at = self.input[start..end].iter().position(|&b| b < 0x20);
            return Err(Error::at(
                "control character (\\u0000-\\u001F) found while parsing a string",
                start + at.unwrap_or(0),
            ));
        }
        self.pos = scan.end;
        // Both ends are next to an ASCII quote, so on character boundaries.
        Ok(self.text.get(start..end))
    }

    /// A string for `visitor`: borrowed when plain, else read by serde_json.
    fn visit_str<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, Error> {
        match self.peek() {
            Some(b'"') => match self.plain_str()? {
                Some(s) => visitor.visit_borrowed_str(s),
                None => self.delegate(|de| de::Deserializer::deserialize_str(de, visitor)),
            },
            _ => self.delegate(|de| de::Deserializer::deserialize_str(de, visitor)),
        }
    }

    /// After an object or array's visitor: its closing bracket, as serde_json's `end_map` and
    /// `end_seq` require.
    fn close(&mut self, bracket: u8) -> Result<(), Error> {
        match self.peek() {
            Some(b) if b == bracket => {
                self.pos += 1;
                Ok(())
            }
            Some(b',') => Err(Error::at("trailing comma", self.pos)),
            Some(_) => Err(Error::at("trailing characters", self.pos)),
            None => Err(self.eof()),
        }
    }

    /// Enters an object or array that is read, as serde_json's recursion check does.
    fn enter(&mut self) -> Result<(), Error> {
        self.remaining_depth -= 1;
        if self.remaining_depth == 0 {
            return Err(Error::at("recursion limit exceeded", self.pos));
        }
        self.pos += 1;
        Ok(())
    }

    fn visit_map<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, Error> {
        self.enter()?;
        let value = visitor
            .visit_map(Entries {
                reader: self,
                first: true,
            })
            .map_err(|e| e.or_at(self.pos))?;
        self.remaining_depth += 1;
        self.close(b'}')?;
        Ok(value)
    }

    fn visit_seq<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, Error> {
        self.enter()?;
        let value = visitor
            .visit_seq(Elements {
                reader: self,
                first: true,
            })
            .map_err(|e| e.or_at(self.pos))?;
        self.remaining_depth += 1;
        self.close(b']')?;
        Ok(value)
    }

    /// `,` before the next entry (not before the first), or `None` at the closing bracket.
    fn next_item(&mut self, first: &mut bool, close: u8) -> Result<Option<u8>, Error> {
        match self.peek() {
            Some(b) if b == close => return Ok(None),
            Some(b',') if !*first => {
                self.pos += 1;
                match self.peek() {
                    Some(b) if b == close => return Err(Error::at("trailing comma", self.pos)),
                    Some(b) => {
                        *first = false;
                        return Ok(Some(b));
                    }
                    None => return Err(self.eof()),
                }
            }
            Some(b) if *first => {
                *first = false;
                return Ok(Some(b));
            }
            Some(_) => {}
            None => return Err(self.eof()),
        }
        Err(Error::at(
            if close == b'}' {
                "expected `,` or `}`"
            } else {
                "expected `,` or `]`"
            },
            self.pos,
        ))
    }
}

/// Where a string ends and what it holds.
struct StringScan {
    /// Just past the closing quote.
    end: usize,
    escaped: bool,
    /// A byte below 0x20, which JSON forbids in strings.
    control: bool,
}

const ONES: u64 = u64::from_le_bytes([1; 8]);
const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);

/// The high bit of each byte of `w` equal to `b`; exact up to the lowest such byte.
fn has_byte(w: u64, b: u8) -> u64 {
    let x = w ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Just past the closing quote of the string whose content starts at `i`, looking only for
/// quotes and backslashes, eight bytes at a time.
#[inline(always)]
fn cross_string(input: &[u8], mut i: usize) -> Option<usize> {
    while let Some(chunk) = input.get(i..i + 8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let stop = has_byte(w, b'"') | has_byte(w, b'\\');
        if stop == 0 {
            i += 8;
            continue;
        }
        i += (stop.trailing_zeros() / 8) as usize;
        if input[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
    while let Some(&b) = input.get(i) {
        match b {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// Bytes that end a number or literal.
fn is_delimiter(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\n' | b'\t' | b'\r' | b',' | b':' | b']' | b'}' | b'"' | b'[' | b'{'
    )
}

/// Forwards the scalar methods to serde_json over the value's bytes.
macro_rules! delegate {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.delegate(|de| de::Deserializer::$method(de, visitor))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Reader<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.peek() {
            Some(b'{') => self.visit_map(visitor),
            Some(b'[') => self.visit_seq(visitor),
            Some(b'"') => self.visit_str(visitor),
            _ => self.delegate(|de| de::Deserializer::deserialize_any(de, visitor)),
        }
    }

    delegate! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_bytes
        deserialize_byte_buf deserialize_unit
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.visit_str(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.visit_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.visit_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.peek() {
            Some(b'n') => {
                if self.input[self.pos..].starts_with(b"null") {
                    self.pos += 4;
                    visitor.visit_none()
                } else {
                    Err(Error::at("expected ident", self.pos))
                }
            }
            Some(_) => visitor.visit_some(self),
            None => Err(self.eof()),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.delegate(|de| de::Deserializer::deserialize_unit_struct(de, name, visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name == RAW_JSON_TOKEN {
            let start = self.skip()?;
            return visitor.visit_borrowed_bytes(&self.input[start..self.pos]);
        }
        // As serde_json: a newtype is its content.
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.peek() {
            Some(b'[') => self.visit_seq(visitor),
            _ => self.delegate(|de| de::Deserializer::deserialize_seq(de, visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Error> {
        self.delegate(|de| de::Deserializer::deserialize_tuple(de, len, visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.delegate(|de| de::Deserializer::deserialize_tuple_struct(de, name, len, visitor))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.peek() {
            Some(b'{') => self.visit_map(visitor),
            _ => self.delegate(|de| de::Deserializer::deserialize_map(de, visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.peek() {
            Some(b'{') => self.visit_map(visitor),
            // serde_json also reads a struct from an array of its fields in order: its own rule.
            _ => {
                self.delegate(|de| de::Deserializer::deserialize_struct(de, name, fields, visitor))
            }
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.delegate(|de| de::Deserializer::deserialize_enum(de, name, variants, visitor))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.skip()?;
        visitor.visit_unit()
    }
}

/// An object's entries.
struct Entries<'r, 'de> {
    reader: &'r mut Reader<'de>,
    first: bool,
}

impl<'de> de::MapAccess<'de> for Entries<'_, 'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.reader.next_item(&mut self.first, b'}')? {
            None => Ok(None),
            Some(b'"') => seed.deserialize(Key(&mut *self.reader)).map(Some),
            Some(_) => Err(Error::at("key must be a string", self.reader.pos)),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.reader.peek() {
            Some(b':') => self.reader.pos += 1,
            Some(_) => return Err(Error::at("expected `:`", self.reader.pos)),
            None => return Err(self.reader.eof()),
        }
        let at = self.reader.pos;
        seed.deserialize(&mut *self.reader).map_err(|e| e.or_at(at))
    }
}

/// An array's elements.
struct Elements<'r, 'de> {
    reader: &'r mut Reader<'de>,
    first: bool,
}

impl<'de> de::SeqAccess<'de> for Elements<'_, 'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.reader.next_item(&mut self.first, b']')? {
            None => Ok(None),
            Some(_) => {
                let at = self.reader.pos;
                seed.deserialize(&mut *self.reader)
                    .map(Some)
                    .map_err(|e| e.or_at(at))
            }
        }
    }
}

/// An object's key: always a string (the keys of every map moat reads are strings).
struct Key<'r, 'de>(&'r mut Reader<'de>);

impl<'de> de::Deserializer<'de> for Key<'_, 'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.0.visit_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.0.skip()?;
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier
    }
}
