"""What the ServerApp does with what nodes send, by role: `replies` checks one reply before it
counts, `bounds` bounds each update's influence and checks the aggregate, `aggregate` forms the
example-weighted mean, `initial` takes the starting adapter only when nodes agree on it, and
`outcome` decides whether a finished run trained at all. Nothing a node sends is trusted."""
