#!/usr/bin/env python3
"""Rebuild examples/data/corpus.jsonl, a small real multi-domain text corpus.

Every text comes from a Debian package (licences: see PROVENANCE.md):
  scripture   sword-text-kjv        King James Bible (1769 text)
  docs        python3.11-doc        Python 3.11 documentation (reST sources)
  dictionary  dict-gcide            GNU Collaborative Int. Dictionary of English
  code        libpython3.11-stdlib  Python 3.11 standard library source

Needs Python 3.11 (stdlib only) plus `apt-get download` and `dpkg-deb`, i.e. a
Debian/Ubuntu machine that reaches a Debian bookworm mirror (run `apt-get
update` first). Nothing is installed: the .debs are unpacked in a temp dir.
Output lines are {"text", "domain", "source"} with source = "<package>/<path
inside it>". Same package versions and options give the same bytes.
"""
import argparse, ast, functools, gzip, json, random, re, struct, subprocess, sys
import tempfile, textwrap, unicodedata, zlib
from pathlib import Path

# Pinned so a rebuild is byte-identical. Point/security releases eventually
# replace these on the mirrors; --any-version then takes the current one.
PACKAGES = {"sword-text-kjv": "14.3-1", "python3.11-doc": "3.11.2-6+deb12u9",
            "dict-gcide": "0.48.5+nmu2", "libpython3.11-stdlib": "3.11.2-6+deb12u9"}
SEED = 1234
MIN_CHARS, TARGET_CHARS, MAX_CHARS = 300, 1200, 2000


# ------------------------------------------------------------------ packages
def fetch(pkg: str, debs: Path, any_version: bool) -> Path:
    """Download one .deb into `debs`, unless a copy is already there."""
    if not list(debs.glob(f"{pkg}_*.deb")):
        pinned = subprocess.run(["apt-get", "download", f"{pkg}={PACKAGES[pkg]}"], cwd=debs)
        if pinned.returncode and not any_version:
            sys.exit(f"cannot download {pkg}={PACKAGES[pkg]}; retry with --any-version "
                     "(the output will then differ from the shipped corpus)")
        if pinned.returncode:
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
    return sorted(debs.glob(f"{pkg}_*.deb"))[-1]


def unpack(deb: Path, dest: Path) -> str:
    """Extract a .deb without installing it; return its version."""
    dest.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                          capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------ chunking
def normalise(text: str) -> str:
    """Tabs to spaces, no trailing blanks or control chars, <= 1 empty line in a row."""
    text = "\n".join(line.rstrip() for line in text.expandtabs(4).splitlines())
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", re.sub(r"\n{3,}", "\n\n", text)).strip()


def split_long(text: str, limit: int) -> list[str]:
    """Cut a piece longer than `limit` at line, else sentence, else word breaks."""
    if len(text) <= limit:
        return [text]
    sep = "\n" if "\n" in text else " "
    units = text.split("\n") if sep == "\n" else re.split(r"(?<=[.;:?!])\s+", text)
    out, cur = [], ""
    for unit in units:
        for part in textwrap.wrap(unit, limit) if len(unit) > limit else [unit]:
            if cur and len(cur) + 1 + len(part) > limit:
                out, cur = out + [cur], ""
            cur = cur + sep + part if cur else part
    return out + [cur]


def pack(pieces: list[str], title: str = "") -> list[str]:
    """Join consecutive pieces (paragraphs, entries) into documents of MIN..MAX
    chars, closing one once it passes TARGET: documents stay runs of
    neighbouring text, not arbitrary byte windows. `title` heads each one."""
    head = title + "\n\n" if title else ""
    docs, cur, size = [], [], len(head)
    for piece in (p for para in pieces for p in split_long(para, MAX_CHARS - len(head))):
        if cur and (size + len(piece) > MAX_CHARS or
                    (size >= MIN_CHARS and size + len(piece) > TARGET_CHARS)):
            docs, cur, size = docs + [cur], [], len(head)
        cur.append(piece)
        size += len(piece) + 2
    texts = (normalise(head + "\n\n".join(d)) for d in docs + [cur] if d)
    return [t for t in texts if MIN_CHARS <= len(t) <= MAX_CHARS]


# ------------------------------------------------------------------ scripture
def kjv_docs(root: Path):
    """SWORD zText module: <testament>.bzs holds (offset, size, raw size) records,
    one zlib block per book in <testament>.bzz; the text is OSIS XML."""
    mod = "usr/share/sword/modules/texts/ztext/engKJV2006eb"
    for testament in ("ot", "nt"):
        blob = (root / mod / f"{testament}.bzz").read_bytes()
        index = (root / mod / f"{testament}.bzs").read_bytes()
        for off, size, _ in struct.iter_unpack("<III", index):
            book = zlib.decompress(blob[off:off + size]).decode("utf-8")
            for chapter in re.split(r"<chapter\b[^>]*\bsID=[^>]*>", book)[1:]:
                for text in pack(osis_paragraphs(chapter)):
                    yield text, f"sword-text-kjv/{mod}/{testament}.bzz"


def osis_paragraphs(xml: str) -> list[str]:
    xml = re.sub(r"<note\b.*?</note>", "", xml, flags=re.S)  # translators' notes
    # Psalm superscriptions are canonical text; book headings are not.
    xml = re.sub(r"<title\b([^>]*)>(.*?)</title>",
                 lambda m: m[2] + "<P/>" if 'canonical="true"' in m[1] else "", xml)
    xml = re.sub(r'<div\b[^>]*type="x-p"[^>]*/>|<lg\b[^>]*sID[^>]*/>', "<P/>", xml)
    paras = []
    for para in xml.split("<P/>"):
        para = re.sub(r"<[^>]*>", "", re.sub(r"<[^>]*/>", " ", para)).replace("¶", "")
        para = re.sub(r"\s+([,.;:?!])", r"\1", " ".join(para.split()))
        paras += [para] if para else []
    return paras


# ------------------------------------------------------------------ docs (reST)
ADORN = re.compile(r"([=\-~^*#\"+.'`_])\1{2,}\s*")  # title underlines, transitions
DIRECTIVE = re.compile(r"\.\.\s+(?:([\w:-]+)::\s*(.*)|.*)$")
OPTION = re.compile(r"\s*:[\w-]+:(\s.*)?$")
BULLET = re.compile(r"([-*+]|#\.|\d+\.|\(?[a-z]\))\s")
INLINE = re.compile(r"``(.+?)``|:[\w:.-]+:`([^`]+)`|`([^`<]+?)(?:\s*<[^>]*>)?`_{0,2}"
                    r"|\*\*([^*\s][^*]*?)\*\*|(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])"
                    r"|\s*\[#[\w-]*\]_|\\(.)")
DROP = set("index toctree highlight module currentmodule moduleauthor sectionauthor testsetup "
           "testcleanup include literalinclude image figure raw only tabularcolumns csv-table "
           "list-table audit-event c:namespace c:namespace-push c:namespace-pop".split())
CODE = set("code-block code sourcecode doctest testcode testoutput productionlist".split())
LABELS = {"note": "Note: {}", "warning": "Warning: {}", "seealso": "See also: {}",
          "versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
          "deprecated": "Deprecated since version {}:",
          "impl-detail": "CPython implementation detail: {}", "availability": "Availability: {}"}


def inline(text: str) -> str:
    """Drop reST inline markup, keeping the words a reader would see."""
    def visible(m: re.Match) -> str:
        if m[2] is not None:  # :role:`title <target>`, :role:`~mod.name`
            ref = re.sub(r"\s*<[^>]*>$", "", m[2]).lstrip("!")
            return ref[1:].split(".")[-1] if ref.startswith("~") else ref
        return next((g for g in (m[1], m[3], m[4], m[5], m[6]) if g is not None), "")
    return INLINE.sub(visible, text).replace("|version|", "3.11")


def prose(lines: list[str]) -> str:
    """Unwrap lines: one line per paragraph or list item."""
    out = []
    for line in (ln.strip() for ln in lines):
        if out and not BULLET.match(line):
            out[-1] += " " + line
        else:
            out.append(line)
    return inline("\n".join(out))


def rst_paragraphs(lines: list[str]) -> list[str]:
    """Plain paragraphs of one section; code (literal blocks) keeps its lines."""
    out, skip, literal, base = [], None, None, 0
    for block in (b.strip("\n").split("\n") for b in re.split(r"\n[ \t]*\n", "\n".join(lines))
                  if b.strip()):
        indent = len(block[0]) - len(block[0].lstrip())
        if skip is not None and indent > skip:
            continue  # body of a dropped directive or of a comment
        if literal is not None and indent > literal:
            base = base or indent  # dedent by the first code line, keep nesting
            out.append("\n".join(ln[min(base, len(ln) - len(ln.lstrip())):] for ln in block))
            continue
        skip, literal, base, head = None, None, 0, block[0].strip()
        if re.match(r"\.\.(\s|$)", head):  # directive, comment or target
            name, args = DIRECTIVE.match(head + " ").groups()
            body = [ln for ln in block[1:] if not OPTION.match(ln)]
            if name is None or name in DROP:
                skip = indent
            elif name in CODE:
                literal = indent
                out += [textwrap.dedent("\n".join(body))] if body else []
            else:  # an admonition, or an API signature such as "dumps(obj)"
                out.append(prose([LABELS.get(name, "{}").format(args.strip())] + body))
        elif all(re.match(r"[+|=]", ln.strip()) for ln in block):  # a table
            rows = (" ".join(ln.strip(" |").split()) for ln in block)
            out.append(inline("\n".join(r for r in rows if not re.fullmatch(r"[-+=| ]*", r))))
        elif head.startswith(">>>"):
            out.append(textwrap.dedent("\n".join(block)))
        else:
            text = prose(block)
            if text.endswith("::"):  # "Example::" introduces a literal block
                literal, text = indent, text[:-1] if text[-3:-2].strip() else text[:-3]
            out.append(text)
    return [p for p in out if p.strip()]


def rst_docs(root: Path):
    base = root / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(base.rglob("*.rst.txt")):
        if path.relative_to(base).parts[0] == "whatsnew":  # changelogs: issue numbers
            continue
        source = f"python3.11-doc/{path.relative_to(root).as_posix()}"
        lines, title, body = path.read_text("utf-8").splitlines(), "", []
        for i, line in enumerate(lines + [""]):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            is_title = line.strip() and line[0] != " " and ADORN.fullmatch(nxt) \
                and len(nxt.strip()) >= len(line.strip()) - 1
            if is_title or i == len(lines):  # a section ends: emit it
                yield from ((t, source) for t in pack(rst_paragraphs(body), title))
                title, body = inline(line.strip()), []
            elif not ADORN.fullmatch(line):
                body.append(line)


# ------------------------------------------------------------------ dictionary
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
NAMED = {"ae": "æ", "oe": "œ", "AE": "Æ", "OE": "Œ", "thorn": "þ", "eth": "ð", "yogh": "ȝ",
         "imac": "ī", "aum": "ä", "root": "√", "deg": "°", "sect": "§", "pounds": "£"}
ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303",
           "=": "\u0304", ",": "\u0327", ".": "\u0323", "-": "\u0304", "*": ""}


def b64num(s: str) -> int:
    """dictd index offsets and sizes are big-endian base-64 numbers."""
    return functools.reduce(lambda n, ch: n * 64 + B64.index(ch), s, 0)


def gcide_clean(entry: str) -> str:
    """Plain text from GCIDE's ASCII markup ({links}, [e^] accents, \\syl*la*bles\\)."""
    entry = re.sub(r"\[[^\]\n]*(Webster|PJC|WordNet|Century)[^\]\n]*\].*", "", entry)
    entry = re.sub(r"\\[^\\]{0,80}\\", "", entry)  # syllabified headword
    entry = re.sub(r"\s*\((?=[^)]*(\[..?.?\]|\"))[^()\n]{1,40}\)", "", entry)  # pronunciation
    entry = re.sub(r"\[([a-zA-Z]+)\]", lambda m: NAMED.get(m[1], m[0]), entry)
    entry = re.sub(r"\[([`'^\"~=,.*-])([a-zA-Z]{1,2})\]|\[([a-zA-Z]{1,2})\^\]",
                   lambda m: m[2] + ACCENTS[m[1]] if m[1] else m[3] + "\u0306", entry)
    entry = unicodedata.normalize("NFC", entry.translate({123: None, 125: None}))
    entry = re.sub(r"(?<=\w)[*\"`]+(?=\w)", "", entry)  # syllables of derived forms: Re*mark"a*bly
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", entry))
    return "\n\n".join(p for p in paras if p).replace(" ,", ",")


def gcide_docs(root: Path):
    """Group alphabetically neighbouring entries into documents."""
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / "gcide.dict.dz").read_bytes())  # dictzip is gzip
    spans = {(b64num(off), b64num(size)) for word, off, size in
             (ln.split("\t") for ln in (base / "gcide.index").read_text("latin-1").splitlines())
             if not word.startswith("00-database")}
    entries = (gcide_clean(data[o:o + n].decode("cp1252", "replace")) for o, n in sorted(spans))
    for text in pack([e for e in entries if e]):
        yield text, "dict-gcide/usr/share/dictd/gcide.dict.dz"


# ------------------------------------------------------------------ code
def code_units(source: str, tree: ast.AST):
    """Top-level functions and classes; the methods of classes too big to keep whole."""
    lines = source.splitlines()
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = textwrap.dedent("\n".join(lines[start - 1:node.end_lineno]))
            if len(text) <= MAX_CHARS:
                yield text
            elif isinstance(node, ast.ClassDef):
                yield from code_units(source, node)


def stdlib_docs(root: Path):
    base = root / "usr/lib/python3.11"
    for path in sorted(base.rglob("*.py")):
        if path.is_symlink() or {"test", "tests", "idle_test"} & set(path.parts):
            continue
        source = path.read_text("utf-8", "replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:  # e.g. lib2to3 fixtures written in Python 2
            continue
        for text in map(normalise, code_units(source, tree)):
            if MIN_CHARS <= len(text) <= MAX_CHARS:
                yield text, f"libpython3.11-stdlib/{path.relative_to(root).as_posix()}"


# ------------------------------------------------------------------ main
DOMAINS = [("scripture", "sword-text-kjv", kjv_docs), ("docs", "python3.11-doc", rst_docs),
           ("dictionary", "dict-gcide", gcide_docs), ("code", "libpython3.11-stdlib", stdlib_docs)]


def sample(lines: list[str], budget: int, rng: random.Random) -> list[str]:
    """A seeded random subset of one domain's JSON lines, within `budget` bytes."""
    lines, chosen, used = lines[:], [], 0
    rng.shuffle(lines)
    for line in lines:
        used += len(line.encode("utf-8")) + 1
        if used > budget:
            break
        chosen.append(line)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("corpus.jsonl"),
                    help="output file (default: corpus.jsonl beside this script)")
    ap.add_argument("--max-bytes", type=int, default=3_600_000,
                    help="size limit of the output file, split evenly between the domains")
    ap.add_argument("--debs", type=Path, help="directory to keep and reuse the .deb files in")
    ap.add_argument("--any-version", action="store_true",
                    help="if a pinned version is gone from the mirror, use the current one")
    args = ap.parse_args()
    rng, out = random.Random(SEED), []
    with tempfile.TemporaryDirectory() as tmp:
        debs = (args.debs or Path(tmp)).resolve()
        debs.mkdir(parents=True, exist_ok=True)
        for domain, pkg, extract in DOMAINS:
            version = unpack(fetch(pkg, debs, args.any_version), Path(tmp, "root", pkg))
            docs: dict[str, str] = {}  # text -> source; drops verbatim repeats
            for text, source in extract(Path(tmp, "root", pkg)):
                docs.setdefault(text, source)
            lines = [json.dumps({"text": t, "domain": domain, "source": s}, ensure_ascii=False)
                     for t, s in docs.items()]
            chosen = sample(lines, args.max_bytes // len(DOMAINS), rng)
            print(f"{domain:<10} {pkg}={version}: {len(lines)} candidates, {len(chosen)} docs, "
                  f"{sum(len(x.encode()) + 1 for x in chosen)} bytes", file=sys.stderr)
            out += chosen
    rng.shuffle(out)  # interleave the domains
    args.out.write_text("".join(line + "\n" for line in out), encoding="utf-8")
    print(f"wrote {len(out)} docs, {args.out.stat().st_size} bytes to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
