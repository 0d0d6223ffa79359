"""How train.py hooks into the Hugging Face Trainer: FSDP on CPU, a report of what each rank
holds (so that a sharded run can be told from a replicated one), no false alarm about tied
weights on resume, and a checkpoint on Ctrl-C."""

import signal

import torch
import transformers


class Trainer(transformers.Trainer):
    """The Hugging Face Trainer, plus one compatibility step: FSDP on CPU.

    accelerate switches to FSDP only on multi-GPU/NPU/XPU set-ups and otherwise silently trains
    with plain DDP. FSDP2 (`fully_shard`) works on CPU with the gloo backend, so when FSDP was
    asked for and the processes run on CPU, the accelerator state is switched to FSDP here
    (CPU offload with pinned memory is not possible without a GPU, hence pin_memory=False)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if self.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
            return
        plugin_args = dict(self.args.fsdp_plugin_args)
        if plugin_args.get("cpu_offload"):
            from torch.distributed.fsdp import CPUOffloadPolicy

            plugin_args["cpu_offload"] = CPUOffloadPolicy(pin_memory=False)
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
        # AcceleratorState re-reads distributed_type from PartialState whenever it is built again.
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def _issue_warnings_after_load(self, load_result) -> None:
        """A checkpoint stores a tied output embedding once, under the input embedding's name, so
        on resume `lm_head.weight` counts as missing although it is loaded: report only the keys
        that really are missing."""
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied_names(self.model)]
        super()._issue_warnings_after_load(load_result)


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (tied weights)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


class ShardReport(transformers.TrainerCallback):
    """Print how many parameter values each rank holds, so a sharded run can be told from a
    replicated one at a glance, and how many layers FSDP's activation checkpointing wraps."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        local = sum(_numel(p)[0] for p in model.parameters())
        total = sum(_numel(p)[1] for p in model.parameters())
        print(f"rank {args.process_index}: holds {local:,} of {total:,} parameter values", flush=True)
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

        # FSDP's activation checkpointing wraps each decoder layer in place.
        wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
        if wrapped:
            print(f"rank {args.process_index}: activation checkpointing wraps {wrapped} layers", flush=True)


def _numel(param: torch.Tensor) -> tuple[int, int]:
    """(values held by this rank, values in the whole parameter) for plain, FSDP2 (DTensor) and
    DeepSpeed ZeRO-3 (partitioned) parameters."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel(), param.ds_numel
    if hasattr(param, "to_local"):
        return param.to_local().numel(), param.numel()
    return param.numel(), param.numel()


class CheckpointOnInterrupt(transformers.TrainerCallback):
    """The first Ctrl-C (or SIGTERM, which launchers send their workers) ends training after the
    current step with a checkpoint saved, so that running the same command again resumes there;
    a second Ctrl-C stops at once."""

    def __init__(self):
        self.interrupted = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._interrupt)

    def _interrupt(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_interrupted(args):
            control.should_save = True
            control.should_training_stop = True

    def _any_rank_interrupted(self, args) -> bool:
        """Whether any process was interrupted: every rank must stop at the same step, since
        saving a sharded checkpoint is a collective operation."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.interrupted
        flag = torch.tensor([float(self.interrupted)], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.interrupted = bool(flag.item())
        return self.interrupted
