"""Continue pre-training an encoder with TRELM through the Hugging Face Trainer, in the shape of
transformers' examples/pytorch/language-modeling/run_mlm.py.

    python examples/run_trelm_mlm.py --output_dir runs/hf --max_steps 300 \\
        --per_device_train_batch_size 16 --learning_rate 1e-3 --logging_steps 10 \\
        --trelm_overrides data.dir=data/wiki-geo routing.refresh=50
    torchrun --nproc_per_node 2 examples/run_trelm_mlm.py ...     # or: accelerate launch ...

Every `TrainingArguments` flag works (--bf16, --gradient_accumulation_steps, --max_grad_norm,
--report_to wandb, --save_steps, --resume_from_checkpoint, ...); the method's settings come from
--trelm_config FILE.yaml and --trelm_overrides section.key=value ... (docs/hf.md). The dataset is
built beforehand with `python -m trelm_fast.data build ...`. The trained model is written to
OUTPUT_DIR/model (loadable with AutoModelForMaskedLM.from_pretrained).
"""
import sys

from transformers import HfArgumentParser

from trelm_fast.config import ConfigError
from trelm_fast.hf import TrelmArguments, TrelmTrainer


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(TrelmArguments).parse_args_into_dataclasses(argv)
    try:
        trainer = TrelmTrainer(args=args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    return 0


if __name__ == "__main__":
    sys.exit(main())
