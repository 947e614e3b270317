# The sft stage: full-parameter (or LoRA) supervised fine-tuning under DeepSpeed, HF Trainer.
#
# The step launches itself through the DeepSpeed launcher (python -m deepspeed.launcher.runner) after checking
# its inputs: {resources.gpu} ranks, one per GPU (scale full), or one CPU rank (scale tiny, gpu=0).
# SLURM: the job is one task holding all N GPUs (resources gpu=N -> --gpus=N); the launcher runs inside that
# task and forks the N local ranks onto the GPUs SLURM assigned (CUDA_VISIBLE_DEVICES). Locally, GPU_RUN takes
# N free GPUs of the host and exports them in CUDA_VISIBLE_DEVICES; the ranks use exactly those.
# A failed or killed job keeps results/.checkpoints/<target>/; the rerun resumes from the last complete one.


use rule stage_step as sft with:
    input:
        model=lambda w: model_input(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
        zero=lambda w: str(Path(workflow.basedir) / RECIPES[w.name]["deepspeed_config"]),  # an absolute path stays
    wildcard_constraints:
        name=names_of("sft"),
    conda:
        f"{ENVS}/deepspeed.yaml"
    container:
        image_of("deepspeed")
    # one thread suits the tiny model's CPU rank (two threads on the shared 2-core machine cost 6x the CPU
    # time); at full scale the cores feed the GPU ranks
    threads: 1 if SCALE == "tiny" else 8
    resources:
        mem_mb=lambda w: 6000 if SCALE == "tiny" else 64000,
        runtime=lambda w: 30 if SCALE == "tiny" else 720,
        gpu=lambda w: gpu_count(w.name),
    params:
        step="sft",
        extra=lambda w, resources: f"--num-gpus {resources.gpu}",
