-- luacheck for the relay's Redis scripts (relay/src/**/lua/*.lua), run by
-- relay/tests/lua_lint.rs. Redis runs Lua 5.1 with these libraries as globals.
std = "lua51"
read_globals = { "redis", "KEYS", "ARGV", "cjson", "cmsgpack", "bit", "struct" }
