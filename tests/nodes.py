"""Simulated nodes on one machine: one launcher per node rank, started together, as SLURM would."""

import threading


def run_simulated_nodes(run_node, nodes: int = 2) -> list:
    """Run ``run_node(node_rank)`` (returning a ``CompletedProcess``) for every node rank at once;
    assert every node succeeded and return their results."""
    results = [None] * nodes

    def node(rank):
        results[rank] = run_node(rank)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in range(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return results
