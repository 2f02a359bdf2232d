"""Spawned ranks that index a .jsonl file (tests/test_dataset.py): apart, so a spawned process imports little."""

import io

import torch

from data.errors import DataError


class CountingFile(io.FileIO):
    """A data file that counts the bytes read from it (every read, the buffered reader's too)."""

    read_bytes = 0

    def readinto(self, buffer):
        count = super().readinto(buffer)
        CountingFile.read_bytes += count or 0
        return count


def index_as_rank(rank, world_size, paths, store, results):
    """Rank ``rank`` of ``world_size`` (a gloo group): for each of ``paths``, JsonLines' index (or its
    error's code and text) and the bytes this rank read, into ``results``."""
    import data.sources.json_lines as json_lines

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    json_lines.open = lambda name, mode: io.BufferedReader(CountingFile(name, "r"))
    found = []
    for path in paths:
        CountingFile.read_bytes = 0
        try:
            loaded = json_lines.JsonLines(path)
            found.append((CountingFile.read_bytes, (loaded.offsets.tolist(), loaded.line_numbers.tolist())))
        except DataError as e:
            found.append((CountingFile.read_bytes, (e.code, str(e))))
    results.put((rank, found))
    torch.distributed.destroy_process_group()


def index_on_ranks(paths, store, world_size=2):
    """Per rank of ``world_size`` spawned ranks, per path of ``paths`` in turn: ``(bytes read, index or error)``."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    processes = [context.Process(target=index_as_rank, args=(rank, world_size, paths, store, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    found = dict(results.get() for _ in processes)
    for process in processes:
        process.join()
    return [found[rank] for rank in range(world_size)]
