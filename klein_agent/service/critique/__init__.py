"""The critique half of the loop, without torch: what changed between two pictures (`compare`), a region of a
picture at full resolution (`zoom`), and the verdicts an agent records (`critic.Critic`, over the store)."""
