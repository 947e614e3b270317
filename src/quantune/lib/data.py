"""Data: the tiny world's text corpus, generators of the real data set formats, and the loaders.

Formats (the fields every loader checks, whatever the source):
  advertisegen  content, summary           (AdvertiseGen: "类型#裙*颜色#黑色*..." -> advertising copy)
  alpaca        instruction, input, output (Alpaca / alpaca-gpt4)
  pref          prompt, chosen, rejected   (preference / summary pairs, seed 003)
  text          text                       (pretraining, calibration, held-out evaluation)

A local data set is a JSON/JSONL file, or a directory holding <split>.jsonl (or <split>.json).
Anything else is a `datasets` hub id, loaded with `datasets.load_dataset` by the same function.
The tiny world's commands (quantune.tiny_world corpus / dataset) call build_corpus and generate.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from pathlib import Path
from typing import Any

from .common import atomic_dir, fail, write_json, write_jsonl

FORMATS: dict[str, tuple[str, ...]] = {
    "advertisegen": ("content", "summary"),
    "alpaca": ("instruction", "input", "output"),
    "pref": ("prompt", "chosen", "rejected"),
    "text": ("text",),
}
SPLITS = ("train", "validation", "test")


# ================================================================ loaders

def _check_row(row: Any, fmt: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise fail(where, f"row is a {type(row).__name__}, not an object",
                   f"write one JSON object per row with fields {', '.join(FORMATS[fmt])}")
    for field in FORMATS[fmt]:
        if field not in row:
            raise fail(where, f"missing field {field!r}", f"add {field!r} (format {fmt} needs {', '.join(FORMATS[fmt])})")
        if not isinstance(row[field], str):
            raise fail(where, f"field {field!r} is {type(row[field]).__name__}, not a string", "store it as a string")
    return {f: row[f] for f in FORMATS[fmt]}


def read_json_records(path: str | Path, fmt: str) -> list[dict]:
    """Read a JSON array or JSONL file and check every row; errors name the file and the line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows: list[dict] = []
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(f"{path}:{e.lineno}", f"invalid JSON ({e.msg})", "fix the file or convert it to JSONL") from None
        for i, row in enumerate(data):
            rows.append(_check_row(row, fmt, f"{path}: row {i}"))
        return rows
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise fail(f"{path}:{lineno}", f"malformed JSON row ({e.msg})",
                       "fix or delete that line (the data_clean step drops and counts such rows)") from None
        rows.append(_check_row(row, fmt, f"{path}:{lineno}"))
    return rows


SPLIT_SLICE = re.compile(r"^(?P<name>[A-Za-z_]+)(?:\[(?P<a>-?\d*):(?P<b>-?\d*)\])?$")


def load_split(ds: dict, split: str, limit: int | None = None) -> list[dict]:
    """Load one split of a resolved data set (see config.resolve_dataset) as a list of checked rows.

    `split` may carry a row slice in the `datasets` syntax, e.g. `train[:1000]` or `train[-100:]` (a hub set with
    only a train split then still has held-out rows); local files are sliced the same way."""
    fmt, source = ds["format"], ds["source"]
    if ds.get("local", True) or Path(source).exists():
        g = SPLIT_SLICE.match(split)
        if g is None:
            raise fail(str(source), f"split {split!r} is not NAME or NAME[a:b]", "write e.g. train or train[:1000]")
        if g["a"] is not None:
            part = slice(int(g["a"]) if g["a"] else None, int(g["b"]) if g["b"] else None)
            rows = load_split(ds, g["name"])[part]
            return rows[:limit] if limit else rows
        p = Path(source)
        if p.is_dir():
            cands = [p / f"{split}.jsonl", p / f"{split}.json"]
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise fail(str(p), f"no {split}.jsonl or {split}.json in the directory",
                           "build the data set first, or point the config at a file")
            rows = read_json_records(found, fmt)
        elif p.is_file():
            rows = read_json_records(p, fmt)
        else:
            raise fail(str(p), "data set path does not exist", "build it (snakemake tiny_world) or fix the path")
    else:  # a hub id: the same checks on what `datasets` returns
        import datasets

        kwargs: dict[str, Any] = {}
        if ds.get("hub_config"):
            kwargs["name"] = ds["hub_config"]
        if ds.get("data_files"):
            kwargs["data_files"] = ds["data_files"]
        hf = datasets.load_dataset(source, split=split, **kwargs)
        rows = [_check_row(r, fmt, f"{source}[{split}] row {i}") for i, r in enumerate(hf)]
    return rows[:limit] if limit else rows


def join_text(rows: list[dict], sep: str = "\n\n") -> str:
    """The text format as one string (WikiText-2 style evaluation joins the whole split)."""
    return sep.join(r["text"] for r in rows if r["text"].strip())


# ================================================================ the tiny world's corpus

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pydoc_documents(chunk_chars: int = 2000) -> list[dict]:
    """CPython's documentation topics (pydoc_data.topics), cut into paragraph-aligned chunks."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        paras = [p.strip() for p in re.split(r"\n\s*\n", topics[name]) if p.strip()]
        buf, n = [], 0
        for para in paras:
            buf.append(para)
            if sum(len(b) for b in buf) >= chunk_chars:
                docs.append({"id": f"pydoc:{name}:{n}", "text": "\n\n".join(buf)})
                buf, n = [], n + 1
        if buf:
            docs.append({"id": f"pydoc:{name}:{n}", "text": "\n\n".join(buf)})
    return docs


def fortune_documents(path: str | Path) -> list[dict]:
    """One document per fortune of a Debian fortunes file (fortunes-zh), colour escapes removed."""
    path = Path(path)
    if not path.is_file():
        raise fail(str(path), "fortunes file not found", "apt-get install fortunes-zh, or drop it from tiny_world.corpus")
    raw = _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    docs = []
    for i, block in enumerate(raw.split("\n%\n")):
        block = block.strip().strip("%").strip()
        if block:
            docs.append({"id": f"fortunes:{path.name}:{i}", "text": block})
    return docs


def split_of(doc_id: str, heldout: float, validation: float) -> str:
    """Deterministic split by document hash: the same document always lands in the same split."""
    h = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < heldout:
        return "test"
    if h < heldout + validation:
        return "validation"
    return "train"


def build_corpus(out: str | Path, pydoc: bool, fortunes: list[str], heldout: float, validation: float) -> dict:
    docs = (pydoc_documents() if pydoc else []) + [d for f in fortunes for d in fortune_documents(f)]
    if not docs:
        raise fail("tiny_world.corpus", "no documents", "enable pydoc_topics or list fortunes files")
    parts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for d in docs:
        parts[split_of(d["id"], heldout, validation)].append({"text": d["text"], "id": d["id"]})
    stats = {f"docs_{s}": len(v) for s, v in parts.items()}
    stats.update({f"chars_{s}": sum(len(r["text"]) for r in v) for s, v in parts.items()})
    with atomic_dir(out) as tmp:
        for s, rows in parts.items():
            write_jsonl(tmp / f"{s}.jsonl", rows)
        write_json(tmp / "stats.json", stats)
    return stats


# ================================================================ generators of the real formats

# AdvertiseGen: key#value pairs joined by '*', as in the real data set, and copy written from them.
ADV_TYPES = {
    "裙": ["连衣裙", "半身裙", "百褶裙", "A字裙"],
    "裤": ["阔腿裤", "牛仔裤", "休闲裤", "直筒裤"],
    "上衣": ["衬衫", "T恤", "卫衣", "针织衫"],
    "外套": ["风衣", "西装外套", "夹克", "毛呢外套"],
}
ADV_ATTRS: dict[str, dict[str, list[str]]] = {
    "颜色": {"黑色": ["经典的黑色显得沉稳大气", "黑色百搭又显瘦"], "白色": ["干净的白色清新自然", "白色纯净又显气质"],
           "红色": ["热烈的红色衬托好气色", "红色明艳又吸睛"], "蓝色": ["清爽的蓝色带来夏日感", "蓝色温柔又知性"],
           "粉色": ["甜美的粉色少女感十足", "粉色温柔又减龄"], "卡其色": ["低调的卡其色复古耐看", "卡其色温暖又百搭"]},
    "风格": {"简约": ["简约的设计大方利落", "整体风格简约不失格调"], "文艺": ["文艺气息扑面而来", "透出淡淡的文艺范"],
           "复古": ["复古的韵味十足", "带来浓浓的复古风情"], "休闲": ["休闲舒适适合日常出行", "轻松休闲随性自在"],
           "通勤": ["干练的通勤风适合职场", "通勤穿搭得体大方"], "甜美": ["甜美可爱尽显少女心", "甜美俏皮十分减龄"]},
    "图案": {"印花": ["精美的印花图案灵动出彩", "印花装饰增添活力"], "条纹": ["经典条纹时尚有型", "条纹元素显得利落"],
           "格子": ["格子图案复古又时髦", "格纹设计层次丰富"], "纯色": ["纯色设计简洁耐看", "纯色款式百搭实穿"],
           "碎花": ["浪漫碎花温柔迷人", "碎花点缀清新甜美"]},
    "材质": {"棉": ["棉质面料亲肤透气", "柔软的棉质穿着舒适"], "雪纺": ["雪纺面料轻盈飘逸", "雪纺材质垂顺柔美"],
           "牛仔": ["牛仔面料耐穿有型", "牛仔材质硬挺帅气"], "针织": ["针织面料柔软有弹性", "针织质地温暖舒适"],
           "蕾丝": ["蕾丝材质精致优雅", "蕾丝点缀浪漫迷人"]},
    "版型": {"修身": ["修身版型勾勒曼妙曲线", "修身剪裁显瘦显高"], "宽松": ["宽松版型遮肉显瘦", "宽松廓形慵懒随性"],
           "直筒": ["直筒版型修饰腿型", "直筒剪裁利落大方"], "A字": ["A字版型俏皮灵动", "A字廓形修饰身材"]},
    "领型": {"圆领": ["圆领设计修饰脖颈", "圆领简洁大方"], "V领": ["V领设计拉长颈部线条", "V领显脸小又优雅"],
           "翻领": ["翻领设计干练有型", "翻领增添精致感"], "立领": ["立领设计挺括有精神", "立领凸显气质"]},
}
ADV_OPENERS = ["这款{t}", "这一款{t}", "此款{t}", "{t}"]
ADV_CLOSERS = ["穿着尽显优雅气质。", "轻松穿出时尚感。", "是日常出街的不错选择。", "让你美美出门。"]


def gen_advertisegen(rng: random.Random) -> dict:
    cat = rng.choice(sorted(ADV_TYPES))
    garment = rng.choice(ADV_TYPES[cat])
    keys = rng.sample(sorted(ADV_ATTRS), k=rng.randint(3, 5))
    pairs = [("类型", cat)] + [(k, rng.choice(sorted(ADV_ATTRS[k]))) for k in keys]
    if cat == "裙":
        pairs.append(("裙型", garment))
    content = "*".join(f"{k}#{v}" for k, v in pairs)
    phrases = [rng.choice(ADV_ATTRS[k][v]) for k, v in pairs if k in ADV_ATTRS]
    color = dict(pairs).get("颜色", "")
    summary = rng.choice(ADV_OPENERS).format(t=color + garment) + "，" + "，".join(phrases) + "，" + rng.choice(ADV_CLOSERS)
    return {"content": content, "summary": summary}


_WORDS = re.compile(r"[A-Za-z]{3,12}")
COLOR_ZH = {"red": "红色", "black": "黑色", "white": "白色", "blue": "蓝色", "green": "绿色", "yellow": "黄色"}


def _vocab() -> list[str]:
    from pydoc_data.topics import topics

    words = sorted({w.lower() for t in topics.values() for w in _WORDS.findall(t)})
    return words


def gen_alpaca(rng: random.Random, vocab: list[str]) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        ws = rng.sample(vocab, rng.randint(3, 6))
        return {"instruction": "Reverse the order of the following words.", "input": " ".join(ws),
                "output": " ".join(reversed(ws))}
    if kind == 1:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        return {"instruction": "Sort these numbers in ascending order.", "input": ", ".join(map(str, nums)),
                "output": ", ".join(map(str, sorted(nums)))}
    if kind == 2:
        a, b = rng.randint(0, 500), rng.randint(0, 500)
        return {"instruction": "What is the sum of the two numbers?", "input": f"{a} and {b}", "output": str(a + b)}
    if kind == 3:
        w = rng.choice(vocab)
        return {"instruction": "Write the word in upper case.", "input": w, "output": w.upper()}
    if kind == 4:
        c = rng.choice(sorted(COLOR_ZH))
        return {"instruction": "Translate the colour name into Chinese.", "input": c, "output": COLOR_ZH[c]}
    ws = rng.sample(vocab, rng.randint(2, 5))
    return {"instruction": f"List {len(ws)} words from the Python documentation, one per line.", "input": "",
            "output": "\n".join(ws)}


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.strip()) > 20]


def gen_summary_pref(rng: random.Random, docs: list[str]) -> dict:
    doc = rng.choice(docs)
    other = rng.choice(docs)
    sents, other_s = _sentences(doc), _sentences(other) or ["No summary."]
    abstract = " ".join(sents[:6])
    return {"prompt": f"Summarize the following abstract.\n{abstract}", "chosen": sents[0],
            "rejected": rng.choice(other_s)}


def generate(kind: str, out: str | Path, counts: dict[str, int], seed: int) -> dict:
    rng = random.Random(f"{kind}:{seed}")
    if kind == "advertisegen":
        make = lambda: gen_advertisegen(rng)  # noqa: E731
    elif kind == "alpaca":
        vocab = _vocab()
        make = lambda: gen_alpaca(rng, vocab)  # noqa: E731
    elif kind == "summary_pref":
        docs = [d["text"] for d in pydoc_documents() if len(_sentences(d["text"])) >= 3]
        make = lambda: gen_summary_pref(rng, docs)  # noqa: E731
    else:
        raise fail("generate", f"unknown kind {kind!r}", "use advertisegen, alpaca or summary_pref")
    fmt = {"advertisegen": "advertisegen", "alpaca": "alpaca", "summary_pref": "pref"}[kind]
    seen: set[str] = set()
    stats = {"format": fmt, "seed": seed}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            rows = []
            tries = 0
            while len(rows) < counts[split]:
                tries += 1
                if tries > 50 * counts[split] + 1000:
                    raise fail(f"tiny_data.{kind}.{split}", "cannot draw that many distinct rows", "ask for fewer")
                row = make()
                key = json.dumps(row, ensure_ascii=False, sort_keys=True)
                if key in seen:  # splits never share a row
                    continue
                seen.add(key)
                rows.append(row)
            write_jsonl(tmp / f"{split}.jsonl", rows)
            stats[f"rows_{split}"] = len(rows)
        write_json(tmp / "stats.json", stats)
    return stats


# ================================================================ CLI


# ---------------------------------------------------------------- near duplicates

def near_key(row: dict) -> str:
    """What near-duplicate detection compares: the row's text with punctuation and spacing removed."""
    text = row["instruction"] + row["input"] + row["output"]
    return "".join(c for c in unicodedata.normalize("NFKC", text).lower() if unicodedata.category(c)[0] in "LN")


def shingles(text: str, k: int = 3) -> set[str]:
    return {text[i:i + k] for i in range(max(1, len(text) - k + 1))}
