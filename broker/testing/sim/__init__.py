"""The RunPod simulator's parts; :mod:`broker.testing.runpod_sim` is the facade to import.

* :mod:`~broker.testing.sim.catalogue`: GPU types, prices, stock and RunPod's message texts;
* :mod:`~broker.testing.sim.faults`: the fault registry (what goes wrong, how often);
* :mod:`~broker.testing.sim.pods`: pods, their sshd listeners, boot and provider-side events;
* :mod:`~broker.testing.sim.graphql`: parsing requests and answering each operation;
* :mod:`~broker.testing.sim.server`: the HTTP server and request handler;
* :mod:`~broker.testing.sim.state`: the state those parts share.
"""
