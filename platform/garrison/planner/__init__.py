"""The capacity planner behind `garrison plan`: which layout to deploy, and what it will do.

From a model, a hardware type, a workload and SLOs it answers how many GPUs, laid out how (tp, ep, prefill
and decode groups, replicas, nodes), with the predicted TTFT / TPOT / throughput, the memory per GPU and the
longest context. One module per part of the answer:

- `dtypes`: bytes per parameter and per KV element of each weight and KV data type;
- `models`: model presets and references, and the parameter counts of each part of a model;
- `hardware`: the hardware catalog (`catalog.yaml`, every figure with its source) and measured profiles;
- `layout`: a deployment's worker groups (role, tp, ep), replicas and nodes;
- `memory`: bytes per GPU of a layout (weights, KV cache with Llama 4's hybrid attention, activations);
- `step_time`: the time of one engine step from its FLOPs, bytes and collectives;
- `workload`: arrivals (rate, concurrency or a JSONL trace) and prompt/output length distributions; SLOs;
- `simulate`: a discrete-event simulation that drives the engine's own Scheduler and BlockManager;
- `search`: layouts within a GPU budget, the best per SLO, the Pareto front, why the others fail;
- `calibrate`: measures this machine with the real engine and writes a profile;
- `report`, `plots`, `helm_values`: what the planner prints, draws and writes for the chart.
"""
