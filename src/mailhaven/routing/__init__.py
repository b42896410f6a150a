"""The routing role: is a recipient welcome, what does it expand to, and where does it go.

`router` is the pure policy (local domains, aliases, relay permission, transport map); `route`
is the record it returns (`Route`: transport and next hop) for the scheduler to group by;
`held` keeps mail for part-time hosts until they ask for it (ETRN) and decides where released
mail goes; `srs` rewrites the sender of forwarded mail (RFC-less SRS, as postsrsd). In:
addresses and client facts. Out: `Reply` refusals, expansions, `Route`s. May import net (for
address parsing) and proto; no I/O.
"""
