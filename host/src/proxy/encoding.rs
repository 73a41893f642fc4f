//! Client encodings. Query text from a client whose `client_encoding` is
//! not UTF-8 (LATIN9, WIN1252, SJIS …) is forwarded byte for byte; the
//! classifier reads a UTF-8 transcoding of it. The name a client gives is
//! normalised the way PostgreSQL does (`utf8`, `Unicode` → `UTF8`,
//! `iso-8859-15` → `LATIN9`), so the `client_encoding` ParameterStatus
//! reports what PostgreSQL would.

use std::borrow::Cow;

use encoding_rs::Encoding;

/// A PostgreSQL client encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientEncoding {
    /// PostgreSQL's name for it (`pg_encoding_to_char`).
    pub name: &'static str,
    /// How to read it; `None` for encodings `encoding_rs` lacks (their
    /// statements cannot be classified and go to the primary).
    decoder: Option<&'static Encoding>,
}

pub const UTF8: ClientEncoding = ClientEncoding {
    name: "UTF8",
    decoder: Some(encoding_rs::UTF_8),
};

/// PostgreSQL's encodings with their aliases (normalised: lower case,
/// letters and digits only), and the WHATWG decoder for each. Where
/// encoding_rs only has a superset (windows-1252 for LATIN1, windows-949
/// for UHC, GBK for EUC_CN), text valid in the smaller one reads the same.
const TABLE: &[(&str, &[&str], Option<&'static Encoding>)] = {
    use encoding_rs as e;
    &[
        ("UTF8", &["utf8", "unicode"], Some(e::UTF_8)),
        ("SQL_ASCII", &["sqlascii"], None),
        ("LATIN1", &["latin1", "iso88591"], Some(e::WINDOWS_1252)),
        ("LATIN2", &["latin2", "iso88592"], Some(e::ISO_8859_2)),
        ("LATIN3", &["latin3", "iso88593"], Some(e::ISO_8859_3)),
        ("LATIN4", &["latin4", "iso88594"], Some(e::ISO_8859_4)),
        ("LATIN5", &["latin5", "iso88599"], Some(e::WINDOWS_1254)),
        ("LATIN6", &["latin6", "iso885910"], Some(e::ISO_8859_10)),
        ("LATIN7", &["latin7", "iso885913"], Some(e::ISO_8859_13)),
        ("LATIN8", &["latin8", "iso885914"], Some(e::ISO_8859_14)),
        ("LATIN9", &["latin9", "iso885915"], Some(e::ISO_8859_15)),
        ("LATIN10", &["latin10", "iso885916"], Some(e::ISO_8859_16)),
        ("ISO_8859_5", &["iso88595"], Some(e::ISO_8859_5)),
        ("ISO_8859_6", &["iso88596"], Some(e::ISO_8859_6)),
        ("ISO_8859_7", &["iso88597"], Some(e::ISO_8859_7)),
        ("ISO_8859_8", &["iso88598"], Some(e::ISO_8859_8)),
        (
            "WIN1250",
            &["win1250", "windows1250"],
            Some(e::WINDOWS_1250),
        ),
        (
            "WIN1251",
            &["win1251", "windows1251", "win"],
            Some(e::WINDOWS_1251),
        ),
        (
            "WIN1252",
            &["win1252", "windows1252"],
            Some(e::WINDOWS_1252),
        ),
        (
            "WIN1253",
            &["win1253", "windows1253"],
            Some(e::WINDOWS_1253),
        ),
        (
            "WIN1254",
            &["win1254", "windows1254"],
            Some(e::WINDOWS_1254),
        ),
        (
            "WIN1255",
            &["win1255", "windows1255"],
            Some(e::WINDOWS_1255),
        ),
        (
            "WIN1256",
            &["win1256", "windows1256"],
            Some(e::WINDOWS_1256),
        ),
        (
            "WIN1257",
            &["win1257", "windows1257"],
            Some(e::WINDOWS_1257),
        ),
        (
            "WIN1258",
            &["win1258", "windows1258", "abc", "tcvn", "tcvn5712", "vscii"],
            Some(e::WINDOWS_1258),
        ),
        ("WIN866", &["win866", "windows866", "alt"], Some(e::IBM866)),
        ("WIN874", &["win874", "windows874"], Some(e::WINDOWS_874)),
        ("KOI8R", &["koi8r", "koi8"], Some(e::KOI8_R)),
        ("KOI8U", &["koi8u"], Some(e::KOI8_U)),
        (
            "SJIS",
            &["sjis", "shiftjis", "mskanji", "win932", "windows932"],
            Some(e::SHIFT_JIS),
        ),
        ("EUC_JP", &["eucjp"], Some(e::EUC_JP)),
        ("EUC_KR", &["euckr"], Some(e::EUC_KR)),
        ("UHC", &["uhc", "win949", "windows949"], Some(e::EUC_KR)),
        ("EUC_CN", &["euccn"], Some(e::GBK)),
        ("GBK", &["gbk", "win936", "windows936"], Some(e::GBK)),
        ("GB18030", &["gb18030"], Some(e::GB18030)),
        ("BIG5", &["big5", "win950", "windows950"], Some(e::BIG5)),
        ("EUC_TW", &["euctw"], None),
        ("EUC_JIS_2004", &["eucjis2004"], None),
        ("SHIFT_JIS_2004", &["shiftjis2004"], None),
        ("JOHAB", &["johab"], None),
        ("MULE_INTERNAL", &["muleinternal"], None),
    ]
};

impl ClientEncoding {
    /// The encoding a client names, as PostgreSQL resolves names: case and
    /// punctuation do not matter. `None`: PostgreSQL would refuse it.
    pub fn lookup(name: &str) -> Option<ClientEncoding> {
        let key: String = name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect();
        TABLE
            .iter()
            .find(|(canon, aliases, _)| aliases.contains(&key.as_str()) || *canon == name)
            .map(|(canon, _, decoder)| ClientEncoding {
                name: canon,
                decoder: *decoder,
            })
    }

    /// The statement text as UTF-8 for the classifier; `None` when it
    /// cannot be read (malformed, or an encoding without a decoder): such
    /// a statement is not classified and runs on the primary.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Option<Cow<'a, str>> {
        if bytes.is_ascii() {
            return std::str::from_utf8(bytes).ok().map(Cow::Borrowed);
        }
        match self.decoder {
            Some(e) => e.decode_without_bom_handling_and_without_replacement(bytes),
            // SQL_ASCII: bytes above 127 mean nothing to the server either;
            // ASCII (quotes, keywords) is what structures the statement.
            None if self.name == "SQL_ASCII" => Some(String::from_utf8_lossy(bytes)),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_like_postgres() {
        for (given, canon) in [
            ("utf8", "UTF8"),
            ("UTF-8", "UTF8"),
            ("Unicode", "UTF8"),
            ("latin9", "LATIN9"),
            ("ISO-8859-15", "LATIN9"),
            ("iso_8859_15", "LATIN9"),
            ("win1252", "WIN1252"),
            ("Windows-1252", "WIN1252"),
            ("SHIFT_JIS", "SJIS"),
            ("sql_ascii", "SQL_ASCII"),
            ("EUC_TW", "EUC_TW"),
        ] {
            assert_eq!(
                ClientEncoding::lookup(given).map(|e| e.name),
                Some(canon),
                "{given}"
            );
        }
        assert_eq!(ClientEncoding::lookup("klingon"), None);
    }

    #[test]
    fn statements_read_as_utf8() {
        let latin9 = ClientEncoding::lookup("LATIN9").unwrap();
        // 'é€' in LATIN9: E9 A4.
        let sql = b"INSERT INTO t VALUES ('\xe9\xa4')";
        assert_eq!(
            latin9.decode(sql).as_deref(),
            Some("INSERT INTO t VALUES ('é€')")
        );
        // SJIS: the second byte of 表 is 0x5C, a backslash in ASCII. Read as
        // bytes it would look like an escape; decoded it is a letter.
        let sjis = ClientEncoding::lookup("SJIS").unwrap();
        assert_eq!(
            sjis.decode(b"SELECT '\x95\x5c'").as_deref(),
            Some("SELECT '表'")
        );
        assert_eq!(UTF8.decode(b"SELECT '\xe9'"), None);
        let tw = ClientEncoding::lookup("EUC_TW").unwrap();
        assert_eq!(tw.decode(b"SELECT '\xa4\xa1'"), None);
        assert_eq!(tw.decode(b"SELECT 1").as_deref(), Some("SELECT 1"));
    }
}
