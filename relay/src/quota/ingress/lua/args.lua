-- A script that runs alone: its own arguments start at ARGV[1] (A0 is their
-- offset; a guarded enqueue puts the enqueue's first).
local A0 = 0
