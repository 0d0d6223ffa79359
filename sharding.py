"""Sharded training on any machine: the Trainer with FSDP on CPU, and a report of what each rank
holds, so that a sharded run can be told from a replicated one."""

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


class ShardReport(transformers.TrainerCallback):
    """Print how many parameter values each rank holds, so a sharded run can be told from a
    replicated one at a glance."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        local = sum(_numel(p)[0] for p in model.parameters())
        total = sum(_numel(p)[1] for p in model.parameters())
        print(f"rank {args.process_index}: holds {local:,} of {total:,} parameter values", flush=True)


def _numel(param: torch.Tensor) -> tuple[int, int]:
    """(values held by this rank, values in the whole parameter) for plain, FSDP2 (DTensor) and
    DeepSpeed ZeRO-3 (partitioned) parameters."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel(), param.ds_numel
    if hasattr(param, "to_local"):
        return param.to_local().numel(), param.numel()
    return param.numel(), param.numel()
