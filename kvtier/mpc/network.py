"""Latency of MPC communication under a network profile, from the bytes and rounds SPU's counters report: the bytes
cross the link at the profile's bandwidth, and each round waits one one-way delay (half the round trip): in SPU's
protocols the parties of a round send at the same time and then read what the others sent, so a round costs one
message's flight, not a request and its reply. ``pessimistic`` charges a whole round trip per round instead. Local
computation is left out: it depends on the machine, not the network."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    name: str
    bits_per_s: float
    rtt_s: float

    def seconds(self, sent_bytes: int, rounds: int, pessimistic: bool = False) -> float:
        return sent_bytes * 8 / self.bits_per_s + rounds * self.rtt_s * (1.0 if pessimistic else 0.5)


NETWORKS = (Network("LAN", 3e9, 0.3e-3), Network("WAN", 400e6, 40e-3))  # the profiles: 3 Gbit/s, 0.3 ms; 400 Mbit/s, 40 ms
