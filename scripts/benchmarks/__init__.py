"""Benchmarks and test tools (`offramp bench TOOL`): not what edge and cloud agree on, so apart from both.

The bench (`compare`: collaborative vs cloud-only vs edge-only over emulated links) and its pieces (`modes`,
`processes`, `report`), the micro-benchmarks (`edge_step`, `batching`, `kv_step`), the load driver and the soak,
the timeline model of the decode loop, and the user-space link emulator the bench and the fault tests put between
edge and cloud. Nothing in the edge, the cloud or `shared` imports this package.
"""
