"""Language codes in the three forms researchers use: ISO 639-1 (``de``), ISO 639-3 (``deu``)
and FLORES-200 / Belebele (``deu_Latn``: ISO 639-3 + ISO 15924 script).

A run keeps the labels its corpus gave (``en`` or ``eng_Latn``); this module is where one form
is turned into another: loading a FLORES-style dataset for ``--langs en,de`` (the
``{iso_639_3}_{iso_15924}`` template), language identification of a ``deu_Latn`` response
(lingua speaks ISO 639-1), matching ``de`` against ``deu_Latn``.

FLORES uses *individual* ISO 639-3 codes where ISO 639-1 names a macrolanguage: Swahili is
``swh_Latn`` (not ``swa``), Arabic ``arb_Arab``, Persian ``pes_Arab``, Malay ``zsm_Latn``,
Estonian ``ekk_Latn``, Latvian ``lvs_Latn``.  The table stores the FLORES code and accepts the
macrolanguage and ISO 639-2/B codes (``swa``, ``ara``, ``ger``, ``chi``) as aliases.  No
dependency: the table is the ~110 languages of lingua and the common FLORES-200 ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import LangNeuronsError

__all__ = ["Language", "parse_language", "to_iso639_1", "to_iso639_3", "to_flores", "format_language",
           "same_language"]

# iso639-1, iso639-3 as FLORES-200 writes it, default script, English name, other accepted 3-letter codes
_TABLE: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("af", "afr", "Latn", "Afrikaans", ()), ("am", "amh", "Ethi", "Amharic", ()),
    ("ar", "arb", "Arab", "Arabic", ("ara",)), ("as", "asm", "Beng", "Assamese", ()),
    ("az", "azj", "Latn", "Azerbaijani", ("aze",)), ("be", "bel", "Cyrl", "Belarusian", ()),
    ("bg", "bul", "Cyrl", "Bulgarian", ()), ("bn", "ben", "Beng", "Bengali", ()),
    ("bo", "bod", "Tibt", "Tibetan", ("tib",)), ("bs", "bos", "Latn", "Bosnian", ()),
    ("ca", "cat", "Latn", "Catalan", ()), ("cs", "ces", "Latn", "Czech", ("cze",)),
    ("cy", "cym", "Latn", "Welsh", ("wel",)), ("da", "dan", "Latn", "Danish", ()),
    ("de", "deu", "Latn", "German", ("ger",)), ("dz", "dzo", "Tibt", "Dzongkha", ()),
    ("el", "ell", "Grek", "Greek", ("gre",)), ("en", "eng", "Latn", "English", ()),
    ("eo", "epo", "Latn", "Esperanto", ()), ("es", "spa", "Latn", "Spanish", ()),
    ("et", "ekk", "Latn", "Estonian", ("est",)), ("eu", "eus", "Latn", "Basque", ("baq",)),
    ("fa", "pes", "Arab", "Persian", ("fas", "per")), ("fi", "fin", "Latn", "Finnish", ()),
    ("fo", "fao", "Latn", "Faroese", ()), ("fr", "fra", "Latn", "French", ("fre",)),
    ("ga", "gle", "Latn", "Irish", ()), ("gl", "glg", "Latn", "Galician", ()),
    ("gn", "grn", "Latn", "Guarani", ()), ("gu", "guj", "Gujr", "Gujarati", ()),
    ("ha", "hau", "Latn", "Hausa", ()), ("he", "heb", "Hebr", "Hebrew", ()),
    ("hi", "hin", "Deva", "Hindi", ()), ("hr", "hrv", "Latn", "Croatian", ()),
    ("ht", "hat", "Latn", "Haitian Creole", ()), ("hu", "hun", "Latn", "Hungarian", ()),
    ("hy", "hye", "Armn", "Armenian", ("arm",)), ("id", "ind", "Latn", "Indonesian", ()),
    ("ig", "ibo", "Latn", "Igbo", ()), ("is", "isl", "Latn", "Icelandic", ("ice",)),
    ("it", "ita", "Latn", "Italian", ()), ("ja", "jpn", "Jpan", "Japanese", ()),
    ("jv", "jav", "Latn", "Javanese", ()), ("ka", "kat", "Geor", "Georgian", ("geo",)),
    ("kk", "kaz", "Cyrl", "Kazakh", ()), ("km", "khm", "Khmr", "Khmer", ()),
    ("kn", "kan", "Knda", "Kannada", ()), ("ko", "kor", "Hang", "Korean", ()),
    ("ku", "kmr", "Latn", "Kurdish (Kurmanji)", ("kur",)), ("ky", "kir", "Cyrl", "Kyrgyz", ()),
    ("la", "lat", "Latn", "Latin", ()), ("lb", "ltz", "Latn", "Luxembourgish", ()),
    ("lg", "lug", "Latn", "Ganda", ()), ("lo", "lao", "Laoo", "Lao", ()),
    ("lt", "lit", "Latn", "Lithuanian", ()), ("lv", "lvs", "Latn", "Latvian", ("lav",)),
    ("mg", "plt", "Latn", "Malagasy", ("mlg",)), ("mi", "mri", "Latn", "Maori", ("mao",)),
    ("mk", "mkd", "Cyrl", "Macedonian", ("mac",)), ("ml", "mal", "Mlym", "Malayalam", ()),
    ("mn", "khk", "Cyrl", "Mongolian", ("mon",)), ("mr", "mar", "Deva", "Marathi", ()),
    ("ms", "zsm", "Latn", "Malay", ("msa", "may")), ("mt", "mlt", "Latn", "Maltese", ()),
    ("my", "mya", "Mymr", "Burmese", ("bur",)), ("nb", "nob", "Latn", "Norwegian Bokmal", ("nor",)),
    ("ne", "npi", "Deva", "Nepali", ("nep",)), ("nl", "nld", "Latn", "Dutch", ("dut",)),
    ("nn", "nno", "Latn", "Norwegian Nynorsk", ()), ("ny", "nya", "Latn", "Chichewa", ()),
    ("oc", "oci", "Latn", "Occitan", ()), ("om", "gaz", "Latn", "Oromo", ("orm",)),
    ("or", "ory", "Orya", "Odia", ("ori",)), ("pa", "pan", "Guru", "Punjabi", ()),
    ("pl", "pol", "Latn", "Polish", ()), ("ps", "pbt", "Arab", "Pashto", ("pus",)),
    ("pt", "por", "Latn", "Portuguese", ()), ("qu", "quy", "Latn", "Quechua", ("que",)),
    ("ro", "ron", "Latn", "Romanian", ("rum",)), ("ru", "rus", "Cyrl", "Russian", ()),
    ("rw", "kin", "Latn", "Kinyarwanda", ()), ("sa", "san", "Deva", "Sanskrit", ()),
    ("sd", "snd", "Arab", "Sindhi", ()), ("si", "sin", "Sinh", "Sinhala", ()),
    ("sk", "slk", "Latn", "Slovak", ("slo",)), ("sl", "slv", "Latn", "Slovenian", ()),
    ("sn", "sna", "Latn", "Shona", ()), ("so", "som", "Latn", "Somali", ()),
    ("sq", "als", "Latn", "Albanian", ("sqi", "alb")), ("sr", "srp", "Cyrl", "Serbian", ()),
    ("st", "sot", "Latn", "Sesotho", ()), ("su", "sun", "Latn", "Sundanese", ()),
    ("sv", "swe", "Latn", "Swedish", ()), ("sw", "swh", "Latn", "Swahili", ("swa",)),
    ("ta", "tam", "Taml", "Tamil", ()), ("te", "tel", "Telu", "Telugu", ()),
    ("tg", "tgk", "Cyrl", "Tajik", ()), ("th", "tha", "Thai", "Thai", ()),
    ("tk", "tuk", "Latn", "Turkmen", ()), ("tl", "tgl", "Latn", "Tagalog", ("fil",)),
    ("tn", "tsn", "Latn", "Tswana", ()), ("tr", "tur", "Latn", "Turkish", ()),
    ("ts", "tso", "Latn", "Tsonga", ()), ("ug", "uig", "Arab", "Uyghur", ()),
    ("uk", "ukr", "Cyrl", "Ukrainian", ()), ("ur", "urd", "Arab", "Urdu", ()),
    ("uz", "uzn", "Latn", "Uzbek", ("uzb",)), ("vi", "vie", "Latn", "Vietnamese", ()),
    ("wo", "wol", "Latn", "Wolof", ()), ("xh", "xho", "Latn", "Xhosa", ()),
    ("yi", "ydd", "Hebr", "Yiddish", ("yid",)), ("yo", "yor", "Latn", "Yoruba", ()),
    ("zh", "zho", "Hans", "Chinese", ("chi", "cmn")), ("zu", "zul", "Latn", "Zulu", ()),
)

_BY_1 = {row[0]: row for row in _TABLE}
_BY_3 = {row[1]: row for row in _TABLE} | {alias: row for row in _TABLE for alias in row[4]}
_TRADITIONAL_REGIONS = ("TW", "HK", "MO")
_CODE = re.compile(r"^([A-Za-z]{2,3})(?:[-_]([A-Za-z]{4}|[A-Za-z]{2}|\d{3}))?(?:[-_]([A-Za-z]{2}|\d{3}))?$")


@dataclass(frozen=True)
class Language:
    """One language in every form; ``iso_639_1`` is None for languages without a 2-letter code."""

    iso_639_1: str | None
    iso_639_3: str  # the FLORES-200 individual code (swh, arb, zsm ...)
    iso_15924: str  # script
    name: str

    @property
    def flores(self) -> str:
        return f"{self.iso_639_3}_{self.iso_15924}"

    def fields(self) -> dict[str, str]:
        """The names a template may use: {iso_639_1}, {iso_639_3}, {iso_15924}, {flores}, {name}."""
        return {"iso_639_1": self.iso_639_1 or self.iso_639_3, "iso_639_3": self.iso_639_3,
                "iso_15924": self.iso_15924, "flores": self.flores, "name": self.name}


def parse_language(code: str) -> Language:
    """``de``, ``deu``, ``ger``, ``deu_Latn``, ``de-DE``, ``zh-Hant``, ``zh_TW``, ``pt_BR`` -> `Language`.

    A script subtag wins over the table's default script (``zh-Hant`` -> ``zho_Hant``); the
    regions TW/HK/MO make Chinese traditional. An unknown language raises one line."""
    m = _CODE.match(str(code).strip())
    row = None
    if m:
        primary = m.group(1).lower()
        row = _BY_1.get(primary) if len(primary) == 2 else _BY_3.get(primary)
    if row is None:
        raise LangNeuronsError(f"unknown language code {code!r}; use ISO 639-1 (de), ISO 639-3 (deu) or the "
                               "FLORES form (deu_Latn)")
    script = row[2]
    for sub in (m.group(2), m.group(3)):
        if sub and len(sub) == 4 and sub.isalpha():
            script = sub.title()
        elif sub and sub.upper() in _TRADITIONAL_REGIONS and row[0] == "zh":
            script = "Hant"
    return Language(row[0], row[1], script, row[3])


def _try(code: str) -> Language | None:
    try:
        return parse_language(code)
    except LangNeuronsError:
        return None


def to_iso639_1(code: str) -> str | None:
    """``deu_Latn`` / ``deu`` / ``de-AT`` -> ``de``; None when unknown or without a 2-letter code."""
    lang = _try(code)
    return lang.iso_639_1 if lang else None


def to_iso639_3(code: str) -> str | None:
    lang = _try(code)
    return lang.iso_639_3 if lang else None


def to_flores(code: str) -> str | None:
    """``de`` -> ``deu_Latn``; ``zh-Hant`` -> ``zho_Hant``; None when unknown."""
    lang = _try(code)
    return lang.flores if lang else None


def format_language(template: str, code: str) -> str:
    """Fill a template such as ``{iso_639_3}_{iso_15924}`` (or ``{flores}``, ``{iso_639_1}``) for a
    language given in any form; a template without placeholders is returned as it is."""
    if "{" not in template:
        return template
    fields = parse_language(code).fields()
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise LangNeuronsError(f"language template {template!r}: unknown field {exc}; use {{iso_639_1}}, "
                               "{iso_639_3}, {iso_15924}, {flores} or {name}") from None


def same_language(a: str, b: str) -> bool:
    """Whether two codes name one language (script ignored): ``de`` == ``deu_Latn`` == ``ger``."""
    la, lb = _try(a), _try(b)
    if la is None or lb is None:
        return a.strip().lower() == b.strip().lower()
    return la.iso_639_3 == lb.iso_639_3
