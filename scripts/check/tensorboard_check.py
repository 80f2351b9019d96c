"""Reads a training run's event files with TensorBoard's own reader (for tests/tensorboard.rs).

    python tensorboard_check.py RUN_DIR

Prints one JSON line: for every scalar tag its (step, value) list, and for every image tag its
(step, width, height) list, as TensorBoard's EventAccumulator sees them (purging the steps a
resumed run wrote again).
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    print(json.dumps({
        "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
        "images": {t: [[e.step, e.width, e.height] for e in acc.Images(t)] for t in tags["images"]},
    }))


if __name__ == "__main__":
    main()
