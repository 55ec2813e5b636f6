"""lm/tools/hlo.py on the shapes of XLA:TPU's optimized HLO: loops without known_trip_count, collectives inside
asynchronous collective fusions (one collective named twice under one channel id)."""

from lm.tools import hlo

TPU_STYLE = """HloModule jit_train_step

%cond (p: (s32[], bf16[1,32])) -> pred[] {
  %constant.7 = s32[]{:T(128)} constant(24)
  %p = (s32[]{:T(128)}, bf16[1,32]{1,0}) parameter(0)
  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte, %constant.7), direction=LT, backend_config={}
}

%fused_start (param_0: bf16[1,32]) -> (bf16[1,32], bf16[8,32]) {
  %param_0 = bf16[1,32]{1,0} parameter(0)
  %all-gather.1 = bf16[8,32]{1,0} all-gather(%param_0), channel_id=140, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}
  ROOT %t = (bf16[1,32]{1,0}, bf16[8,32]{1,0}) tuple(%param_0, %all-gather.1)
}

%async_collective_fusion (param_0: bf16[1,32]) -> bf16[8,32] {
  %param_0 = bf16[1,32]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[8,32]{1,0} all-gather(%param_0), channel_id=140, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}
}

%body (p: (s32[], bf16[1,32])) -> (s32[], bf16[1,32]) {
  %p = (s32[]{:T(128)}, bf16[1,32]{1,0}) parameter(0)
  %w = bf16[1,32]{1,0} get-tuple-element(%p), index=1
  %start = (bf16[1,32]{1,0}, bf16[8,32]{1,0}) fusion(%w), kind=kCustom, calls=%fused_start
  %use = bf16[8,32]{1,0} fusion(%w), kind=kOutput, calls=%async_collective_fusion
  %sum = f32[4]{0} all-reduce(%x), channel_id=141, replica_groups={}, to_apply=%add
  ROOT %r = (s32[]{:T(128)}, bf16[1,32]{1,0}) tuple(%i, %w)
}

ENTRY %main (a: bf16[1,32]) -> bf16[1,32] {
  %a = bf16[1,32]{1,0} parameter(0)
  %while.1 = (s32[]{:T(128)}, bf16[1,32]{1,0}) while(%tuple.1), condition=%cond, body=%body
  ROOT %out = bf16[1,32]{1,0} get-tuple-element(%while.1), index=1
}
"""


def test_tpu_loops_and_collective_fusions_are_counted_once_per_iteration():
  found = hlo.collectives(TPU_STYLE)
  assert found["all-gather"].count == 24  # once per iteration of the 24-trip loop, not twice
  assert found["all-gather"].bytes == 24 * 8 * 32 * 2
  assert found["all-reduce"].count == 24 and found["all-reduce"].bytes == 24 * 16


def test_a_known_trip_count_wins():
  text = TPU_STYLE.replace("condition=%cond, body=%body",
                           'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}')
  assert hlo.collectives(text)["all-gather"].count == 3


def test_a_kernel_config_over_several_lines_does_not_end_its_computation():
  """XLA:TPU writes a Mosaic kernel's (splash attention's) backend_config with newlines, one line of it
  starting with "}}": the collectives after it in the computation still count."""
  text = TPU_STYLE.replace(
      "  %a = bf16[1,32]{1,0} parameter(0)\n",
      '  %a = bf16[1,32]{1,0} parameter(0)\n  %k = f32[2]{0} custom-call(%a), custom_call_target="tpu_custom_call", '
      'backend_config={"custom_call_config": {"body": "x",\n"xprof_metadata":"{}"\n}}, metadata={op_name="splash"}\n'
      "  %after = f32[1024]{0} all-reduce(%y), channel_id=150, replica_groups={}, to_apply=%add\n")
  found = hlo.collectives(text)
  assert found["all-reduce"].count == 24 + 1 and found["all-reduce"].bytes == 24 * 16 + 4096


def test_collectives_sharing_a_channel_id_in_one_computation_all_count():
  """shard_map's all-to-alls inside one loop body, numbered alike by XLA:TPU: each is a collective."""
  text = TPU_STYLE.replace(
      "  %sum = f32[4]{0} all-reduce(%x), channel_id=141, replica_groups={}, to_apply=%add\n",
      "  %sum = f32[4]{0} all-reduce(%x), channel_id=141, replica_groups={}, to_apply=%add\n"
      "  %a2a.1 = f32[8,1,64]{2,1,0} all-to-all(%s), channel_id=1, replica_groups={}, dimensions={0}\n"
      "  %a2a.2 = f32[8,1,32]{2,1,0} all-to-all(%t), channel_id=1, replica_groups={}, dimensions={0}\n")
  found = hlo.collectives(text)
  assert found["all-to-all"].count == 2 * 24 and found["all-to-all"].bytes == 24 * (8 * 64 + 8 * 32) * 4
  assert found["all-gather"].count == 24  # the fusion's twin is still counted once
