#!/usr/bin/env python3
"""Independent oracle for qopt's tokenizer: encodes a list of tricky strings and the Brown
validation text with GPT-2's reference tokenizers (Hugging Face transformers' GPT2Tokenizer,
the original regex + BPE code, and tiktoken when available), both loaded from the same local
encoder.json / vocab.bpe, and writes tests/fixtures/gpt2_reference.json. tests/test_tokenizer.cpp
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

def main():
    vocab_dir, brown_val, out = sys.argv[1:4]
    from transformers import GPT2Tokenizer
    hf = GPT2Tokenizer(vocab_file=f"{vocab_dir}/encoder.json", merges_file=f"{vocab_dir}/vocab.bpe")
    encoders = {"transformers.GPT2Tokenizer": lambda s: hf.encode(s)}
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        ranks = data_gym_to_mergeable_bpe_ranks(f"{vocab_dir}/vocab.bpe", f"{vocab_dir}/encoder.json")
        pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        enc = tiktoken.Encoding(name="gpt2-local", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
        encoders["tiktoken"] = lambda s: enc.encode_ordinary(s)
    except Exception as e:  # tiktoken missing or its loader changed: one oracle is enough
        print("tiktoken unavailable:", e)
    text = open(brown_val, encoding="utf-8").read()
    results = {}
    for name, encode in encoders.items():
        results[name] = {"cases": [encode(c) for c in CASES]}
        ids = encode(text)
        results[name]["brown_val"] = {"count": len(ids), "fnv64": fnv64(ids), "first": ids[:50]}
    names = list(results)
    agree = all(results[n] == results[names[0]] for n in names)
    print("oracles:", names, "agree:", agree)
    fixture = {"source": names[0], "oracles_agree": agree, "oracles": names,
               "cases": [{"text": c, "ids": i} for c, i in zip(CASES, results[names[0]]["cases"])],
               "brown_val": results[names[0]]["brown_val"]}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=True, indent=0)
    print("wrote", out, len(CASES), "cases; brown val", fixture["brown_val"]["count"], "tokens")

if __name__ == "__main__":
    main()
