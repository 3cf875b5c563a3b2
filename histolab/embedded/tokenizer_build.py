"""Build a CLIP-format BPE vocabulary (``vocab.json`` + ``merges.txt``).

SD 1.5's tokenizer cannot be downloaded here, so the embedded model gets its
own, learned from a corpus of captions and pathology vocabulary with the same
byte-level BPE scheme as OpenAI's CLIP: any text still tokenizes (bytes are the
fallback), ``transformers.CLIPTokenizer`` loads the files unchanged, and
textual-inversion tokens are added to it the usual way.
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import regex

from histolab.data.prompts import CLASS_CAPTIONS, GENERIC_TISSUE_CAPTIONS
from histolab.data.sources import PHOTO_SOURCES

# The pre-tokenization pattern of CLIPTokenizer (lower-cased input).
PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

PATHOLOGY_WORDS = """
adenocarcinoma adenoma serrated normal tumour tumor cancer carcinoma benign malignant metastasis
stroma stromal epithelium epithelial gland glands glandular crypt crypts mucosa mucus mucin mucinous
nucleus nuclei nuclear chromatin nucleolus cytoplasm membrane cell cells cellular lymphocyte lymphocytes
macrophage neutrophil plasma fibroblast fibrosis necrosis necrotic debris adipose fat muscle smooth
vessel vessels blood erythrocytes inflammation inflammatory infiltrate mitosis mitotic atypia atypical
pleomorphism hyperchromatic eosinophilic basophilic keratin keratinocyte dermis epidermis skin colon
colonic colorectal rectum stomach breast lung liver kidney prostate lymph node lymphoma tissue tissues
histology histological histopathology pathology pathologist microscopy microscope slide section patch
tile stain stained staining hematoxylin haematoxylin eosin h&e ihc dab immunohistochemistry immunostain
positive negative background artefact artifact blur blurry sharp focus magnification high low grade
differentiated poorly well moderately invasive in situ ductal lobular squamous basal glioma sarcoma
melanoma nevus ulcer polyp hyperplasia dysplasia low-grade high-grade texture structure architecture
pink purple blue brown red white dark light bright pale color colour contrast patchy swollen swelling
smudged seam tiling cast implausible realistic synthetic generated real image images photo photograph
of a an the and with in on at by for from to is are this that showing shows showing large small
round oval spindle dense loose sparse many few some cluster clusters region area field view
""".split()

COMMON_WORDS = """
photo picture painting drawing sketch render art style detailed high quality best worst ugly
cat dog person man woman astronaut rocket launch space galaxy galaxies star stars sky sun moon
cup coffee tea brick wall grass gravel stone rock sand water sea tree trees flower leaf leaves
retina eye fundus car house city street road building face hand people animal bird
one two three four five six seven eight nine ten left right top bottom center middle
""".split()

# Class names of public histology datasets users are likely to bring.
DATASET_LABELS = """
adenocarcinoma_tissue serrated_tissue normal_tissue adenoma_tissue
adi back deb lym muc mus norm str tum
skin_he tumour_he colon_ihc skin_he_tissue tumour_he_tissue colon_ihc_tissue
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode map of GPT-2 and CLIP."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def corpus() -> list[str]:
    texts: list[str] = []
    for caps in CLASS_CAPTIONS.values():
        texts.extend(caps * 20)
    texts.extend(list(GENERIC_TISSUE_CAPTIONS) * 20)
    texts.extend([p.caption for p in PHOTO_SOURCES] * 10)
    texts.extend(PATHOLOGY_WORDS * 3)
    texts.extend(COMMON_WORDS * 2)
    texts.extend(DATASET_LABELS * 2)
    return texts


def learn_bpe(texts: list[str], num_merges: int) -> list[tuple[str, str]]:
    byte_enc = bytes_to_unicode()
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for t in texts:
        for tok in PAT.findall(t.lower()):
            chars = [byte_enc[b] for b in tok.encode("utf-8")]
            chars[-1] = chars[-1] + "</w>"
            words[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, c in words.items():
            for a, b in itertools.pairwise(w):
                pairs[(a, b)] += c
        if not pairs:
            break
        # Deterministic tie-break: highest count, then lexicographic.
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new_words: collections.Counter[tuple[str, ...]] = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def build(out_dir: str | Path, num_merges: int = 1200) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe(corpus(), num_merges)
    base = list(bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return out
