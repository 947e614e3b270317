"""CUDA check of quantune.lib.measure.sign_split (fp16, model on the GPU): a random OPT, RTN / AWQ / GPTQ 3-bit
through quantize_llmcompressor, then sign_split; the quantized model must compute the same logits afterwards and
W + dW must reproduce the quantized model's NLL."""
import json, sys, time, os
sys.path.insert(0, "src")
import torch
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
from quantune.lib.measure import perplexity, sign_split
from quantune.lib.quant_arch import quantized_linears
from quantune.lib.quant_backends import quantize_llmcompressor

torch.manual_seed(0)
cfg = OPTConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, ffn_dim=2048, vocab_size=4096,
                word_embed_proj_dim=512, max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=2)
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(4096)}, unk_token="w3")))
ids = torch.randint(4, 4096, (8192,))
calib = {"input_ids": [torch.randint(4, 4096, (256,)).tolist() for _ in range(16)]}
out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
awq_maps = [{"smooth": r"re:.*layers\.\d+\.self_attn_layer_norm$", "balance": [r"re:.*layers\.\d+\.self_attn\.q_proj$", r"re:.*layers\.\d+\.self_attn\.k_proj$", r"re:.*layers\.\d+\.self_attn\.v_proj$"]},
            {"smooth": r"re:.*layers\.\d+\.final_layer_norm$", "balance": [r"re:.*layers\.\d+\.fc1$"]},
            {"smooth": r"re:.*layers\.\d+\.fc1$", "balance": [r"re:.*layers\.\d+\.fc2$"]}]
import tempfile
cfg_dir = tempfile.mkdtemp()
cfg.save_pretrained(cfg_dir)  # llm-compressor re-reads the model's config from _name_or_path
for method in ("rtn", "awq", "gptq"):
    model = OPTForCausalLM(cfg).to("cuda", torch.float16).eval()
    model.config._name_or_path = cfg_dir
    base = perplexity(model, ids, 256, 256)["nll"]
    rec = {"method": method, "bits": 3, "group_size": 128, "zero_point": True, "ignore": ["lm_head"], "calibration_batch_size": 4}
    original = None
    if method == "gptq":
        original = {n: m.weight.detach().to("cpu", copy=True) for n, m in quantized_linears(model, ["lm_head"])}
    t = time.perf_counter()
    quantize_llmcompressor(model, tok, rec, None if method == "rtn" else calib, awq_maps if method == "awq" else None)
    with torch.no_grad():
        before = model(ids[:256][None].cuda()).logits
    quant = perplexity(model, ids, 256, 256)["nll"]
    s = sign_split(model, ids, 256, 256, original)
    with torch.no_grad():
        after = model(ids[:256][None].cuda()).logits
    r = dict(s, nll_base=base, nll_quant=quant, restored=bool(torch.equal(before, after)),
             weight_device=str(next(model.parameters()).device), plus_minus_quant=s["nll_fp"] + s["nll_odd"] + s["nll_even"] - quant,
             seconds=time.perf_counter() - t)
    out[method] = r
    print(method, json.dumps(r), flush=True)
os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "gpu_split.json"), "w"), indent=1)
ok = all(out[m]["restored"] and abs(out[m]["plus_minus_quant"]) < 1e-3 for m in ("rtn", "awq", "gptq"))
print("OK" if ok else "MISMATCH")
