# quantune: LLM quantization and fine-tuning recipes as Snakemake targets.
#   snakemake --cores 2 all                      # the tiny world and every target at tiny scale (CPU)
#   snakemake --cores 2 eval_opt67b              # one target
#   snakemake --config scale=full --use-conda -n eval_opt67b
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/stage.smk"
include: "rules/tiny.smk"
include: "rules/shape.smk"
include: "rules/evaluate.smk"
include: "rules/quantize.smk"
include: "rules/lora.smk"
include: "rules/data.smk"
include: "rules/sft.smk"
include: "rules/gguf.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
