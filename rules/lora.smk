# LoRA / QLoRA supervised fine-tuning (stage lora_sft), the comparison of trained adapters against each other
# and the untuned base (stage lora_compare), and the rank sweep (stage lora_sweep).
# A job's env: envs/finetune.yaml, or envs/chatglm3.yaml for `env: chatglm3` recipes at full scale
# (quantune.lora_sft.workflow_env says why); the image is the env's.
from quantune.lora_sft import workflow_env, workflow_runtime

LORA_ENVS = {"finetune": f"{ENVS}/finetune.yaml", "chatglm3": f"{ENVS}/chatglm3.yaml"}


use rule stage_step as lora_sft with:
    input:
        model=lambda w: model_input(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("lora_sft"),
    conda:
        lambda w: LORA_ENVS[workflow_env(RECIPES[w.name], SCALE)]
    container:
        lambda w: image_of(workflow_env(RECIPES[w.name], SCALE))
    threads: 2
    resources:
        # a 6B model in NF4 is ~4 GB on the GPU; the host holds a bf16 shard at a time while quantizing
        mem_mb=lambda w: 6000 if SCALE == "tiny" else 48000,
        runtime=lambda w: workflow_runtime(RECIPES[w.name], SCALE),
        gpu=lambda w: gpu_count(w.name),
    params:
        step="lora_sft",


use rule lora_sft as lora_compare with:
    input:
        adapters=lambda w: read_targets(w.name),
        model=lambda w: model_input(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("lora_compare"),
    params:
        step="lora_compare",


# lora_sweep: one lora_sft run per rank of the recipe's `ranks` (wildcard {rank}) into results/<target>/r<rank>/,
# then the table and plot over the ranks in results/<target>/.
use rule lora_sft as lora_sweep_run with:
    output:
        f"{RES}/{{name}}/r{{rank}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}_r{{rank}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}_r{{rank}}.tsv"
    wildcard_constraints:
        name=names_of("lora_sweep"),
        rank=r"\d+",
    conda:
        f"{ENVS}/finetune.yaml"
    container:
        image_of("finetune")
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else 16000,
        runtime=lambda w: workflow_runtime(RECIPES[w.name], SCALE),
        gpu=lambda w: gpu_count(w.name),
    params:
        step="lora_sweep",
        extra=lambda w: f"--rank {w.rank}",
        out=lambda w: f"{RES}/{w.name}/r{w.rank}",


use rule stage_step as lora_sweep with:
    input:
        runs=lambda w: [f"{RES}/{w.name}/r{k}/metrics.json" for k in RECIPES[w.name]["ranks"]],
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("lora_sweep"),
    conda:
        f"{ENVS}/finetune.yaml"
    container:
        image_of("finetune")
    threads: 1
    params:
        step="lora_sweep",
