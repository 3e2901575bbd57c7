#!/usr/bin/env python3
"""Independent oracles for qopt's tokenizer: encodes a list of tricky strings and the Brown
validation text with three GPT-2 tokenizers loaded from the same local encoder.json /
vocab.bpe -- tiktoken, Hugging Face transformers' GPT2Tokenizer, and GPT-2's published
algorithm (the `regex` pattern + greedy lowest-rank BPE) written out below -- checks that
they agree, and writes tests/fixtures/gpt2_reference.json. tests/test_tokenizer.cpp
compares qopt's ids with it. Needs transformers (present on the GPU machines); run:
    python3 tools/gpt2_tokenizer_oracle.py build/data/gpt2 build/data/brown/brown_val.txt tests/fixtures/gpt2_reference.json
"""
import json, sys

CASES = [
    "Hello world", " the quick brown fox", "", " ", "  ", "\n", "\n\n", "a\n\nb", "x  y", "x   \ty",
    "trailing spaces   ", "   leading", "\t\ttabs\tand\nnewlines\r\n", "don't", "I'M", "they're we've I'll he'd she's",
    "'s start", " 's", "rock'n'roll", "''quoted''", "1234567890", "3.14159", "x2 2x 10th", "$100,000.00",
    "!!!???...", "a---b", "e-mail@example.com", "https://example.com/a?b=c&d=e", "CamelCaseWord", "ALLCAPS",
    "naïve café résumé", "Ünïcödé", "中文字符测试", "日本語のテキスト", "한국어", "Привет, мир!", "مرحبا بالعالم",
    "emoji 😀🎉👍🏽", "zero\u200bwidth", "nbsp\u00a0here", "ideographic\u3000space", "x\u2028y", "²³ ½ Ⅻ ٣٤",
    "combining e\u0301 marks", "   \n   \n", "end with newline\n", "<|endoftext|>", "mixed 123abc ABC123",
    "tab\t\t\t", "Mr. Smith's dog's bone", "O'Neill", "the  the   the    the",
]

def fnv64(ids):
    h = 0xCBF29CE484222325
    for i in ids:
        for b in int(i).to_bytes(4, "little"):
            h ^= b
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h

PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def algorithm_encoder(vocab_dir):
    """GPT-2's algorithm: regex pieces, bytes -> printable unicode, merge lowest rank first."""
    import regex
    encoder = json.load(open(f"{vocab_dir}/encoder.json", encoding="utf-8"))
    merges = open(f"{vocab_dir}/vocab.bpe", encoding="utf-8").read().split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m)}
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in printable]
    byte_char = {b: chr(b) for b in printable}
    byte_char.update({b: chr(256 + i) for i, b in enumerate(extra)})
    pattern = regex.compile(PATTERN)
    cache = {}
    def bpe(word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best = min(pairs)[0]
            if best == 1 << 60:
                break
            first, second = next((parts[i], parts[i + 1]) for r, i in pairs if r == best)
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    out.append(first + second); i += 2
                else:
                    out.append(parts[i]); i += 1
            parts = out
        return parts
    def encode(text):
        ids = []
        for piece in pattern.findall(text):
            word = "".join(byte_char[b] for b in piece.encode("utf-8"))
            if word not in cache:
                cache[word] = [encoder[t] for t in bpe(word)]
            ids.extend(cache[word])
        return ids
    return encode

def main():
    vocab_dir, brown_val, out = sys.argv[1:4]
    encoders = {"gpt2-algorithm": algorithm_encoder(vocab_dir)}
    try:
        # transformers wants the standard file names in a folder.
        import os, shutil, tempfile
        from transformers import GPT2Tokenizer
        folder = tempfile.mkdtemp()
        shutil.copy(f"{vocab_dir}/encoder.json", os.path.join(folder, "vocab.json"))
        shutil.copy(f"{vocab_dir}/vocab.bpe", os.path.join(folder, "merges.txt"))
        hf = GPT2Tokenizer.from_pretrained(folder)
        assert len(hf) == 50257, f"transformers loaded {len(hf)} tokens"
        encoders["transformers.GPT2Tokenizer"] = lambda s: hf.encode(s)
    except Exception as e:
        print("transformers unavailable:", e)
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        ranks = data_gym_to_mergeable_bpe_ranks(f"{vocab_dir}/vocab.bpe", f"{vocab_dir}/encoder.json")
        enc = tiktoken.Encoding(name="gpt2-local", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
        encoders["tiktoken"] = lambda s: enc.encode_ordinary(s)
    except Exception as e:  # tiktoken missing or its loader changed: one oracle is enough
        print("tiktoken unavailable:", e)
    text = open(brown_val, encoding="utf-8").read()
    results = {}
    for name, encode in encoders.items():
        results[name] = {"cases": [encode(c) for c in CASES]}
        ids = encode(text)
        results[name]["brown_val"] = {"count": len(ids), "fnv64": fnv64(ids), "first": ids[:50]}
    # transformers parses special tokens inside text; qopt, tiktoken's encode_ordinary and
    # GPT-2's own encoder treat "<|endoftext|>" as plain text, so those cases are left out
    # of the comparison with transformers (and only with it).
    def comparable(name, text):
        return not (name.startswith("transformers") and "<|endoftext|>" in text)
    names = list(results)
    agree = len(names) >= 2
    for n in names[1:]:
        for c, a, b in zip(CASES, results[names[0]]["cases"], results[n]["cases"]):
            if comparable(n, c) and a != b:
                agree = False
                print(f"disagree on {c!r}: {names[0]} {a} vs {n} {b}")
        if results[n]["brown_val"] != results[names[0]]["brown_val"]:
            agree = False
            print(f"disagree on the Brown text: {names[0]} vs {n}")
    print("oracles:", names, "agree:", agree)
    fixture = {"source": names[0], "oracles_agree": agree, "oracles": names,
               "cases": [{"text": c, "ids": i} for c, i in zip(CASES, results[names[0]]["cases"])],
               "brown_val": results[names[0]]["brown_val"]}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=True, indent=0)
    print("wrote", out, len(CASES), "cases; brown val", fixture["brown_val"]["count"], "tokens")

if __name__ == "__main__":
    main()
