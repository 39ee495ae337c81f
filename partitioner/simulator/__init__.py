"""The what-if simulator: replays a schedule with cost-model durations, without any GPU."""
