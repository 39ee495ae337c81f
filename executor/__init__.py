"""The torch side of gpipe-planner: profiler, pipeline runtime and runners (see DESIGN.md)."""

__all__: list[str] = []
