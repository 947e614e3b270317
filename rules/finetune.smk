# LoRA / QLoRA supervised fine-tuning (stage lora_sft) and the comparison of trained adapters against each
# other and the untuned base (stage lora_compare). Issue 4: qlora_chatglm_{steps100,linear,cosine}, qlora_compare.


def lora_env(name):
    """The conda env of a recipe. THUDM/chatglm3-6b's remote code runs only on the transformers that
    envs/chatglm3.yaml pins; at tiny scale the same code runs on the tiny native-GLM model, which needs the
    project's current stack (envs/finetune.yaml)."""
    if SCALE == "full" and RECIPES[name].get("env") == "chatglm3":
        return f"{ENVS}/chatglm3.yaml"
    return f"{ENVS}/finetune.yaml"


def lora_runtime(name):
    """Minutes. Seed 000 on one RTX 4090: 100 steps 8 min, one AdvertiseGen epoch (1,791 / 1,194 steps)
    2.2 h; the limits leave room for a slower GPU, the held-out evaluation and model download."""
    if SCALE == "tiny":
        return 30
    r = RECIPES[name]
    if r["stage"] == "lora_compare":
        return 180
    return 120 if r.get("max_steps") else 720


def compare_adapters(name):
    """The metrics.json of every lora_sft target a comparison reads (its adapters)."""
    out = []
    for label, target in RECIPES[name]["adapters"].items():
        if RECIPES.get(target, {}).get("stage") != "lora_sft":
            sys.stderr.write(
                f"quantune: error: {recipe_path(name)}: key adapters.{label}: {target!r} is not a lora_sft "
                f"recipe; fix: use one of: {', '.join(recipes_of('lora_sft'))}\n"
            )
            sys.exit(1)
        out.append(f"{RES}/{target}/metrics.json")
    return out


for _n in recipes_of("lora_compare"):
    compare_adapters(_n)  # an unknown adapter target stops the workflow before any job runs


rule lora_sft:
    input:
        model=lambda w: model_input(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    wildcard_constraints:
        name="|".join(recipes_of("lora_sft")) or "no-lora-sft-recipes",
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    conda:
        lambda w: lora_env(w.name)
    threads: 2
    resources:
        # a 6B model in NF4 is ~4 GB on the GPU; the host holds a bf16 shard at a time while quantizing
        mem_mb=lambda w: 6000 if SCALE == "tiny" else 48000,
        runtime=lambda w: lora_runtime(w.name),
        gpu=lambda w: gpu_count(w.name),
    shell:
        GPU_RUN + "python -m quantune.finetune train --recipe {input.recipe} --out {params.out}"
        " --config-json {params.cfg:q} > {log} 2>&1"


rule lora_compare:
    input:
        adapters=lambda w: compare_adapters(w.name),
        model=lambda w: model_input(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    wildcard_constraints:
        name="|".join(recipes_of("lora_compare")) or "no-lora-compare-recipes",
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    conda:
        lambda w: lora_env(w.name)
    threads: 2
    resources:
        mem_mb=lambda w: 6000 if SCALE == "tiny" else 48000,
        runtime=lambda w: lora_runtime(w.name),
        gpu=lambda w: gpu_count(w.name),
    shell:
        GPU_RUN + "python -m quantune.finetune compare --recipe {input.recipe} --out {params.out}"
        " --config-json {params.cfg:q} > {log} 2>&1"
