-- Replays pre-signed requests (bench/load.py writes them: "<length>\n<raw HTTP>" each),
-- one disjoint slice per thread, and reports one JSON line for bench/load.py to read.
-- Usage: wrk ... -s bench/wrk.lua URL -- POOL_FILE THREADS

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local data = file:read("*a")
  file:close()
  local count = tonumber(args[2])
  pool, cursor, non2xx, replayed = {}, 0, 0, 0
  local pos, index = 1, 0
  while pos <= #data do
    local newline = data:find("\n", pos, true)
    local length = tonumber(data:sub(pos, newline - 1))
    if index % count == id then
      pool[#pool + 1] = data:sub(newline + 1, newline + length)
    end
    index = index + 1
    pos = newline + 1 + length
  end
end

function request()
  cursor = cursor % #pool + 1
  return pool[cursor]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
  if headers["Gw-Replayed"] then
    replayed = replayed + 1
  end
end

function done(summary, latency, requests)
  local bad, replays = 0, 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
    replays = replays + thread:get("replayed")
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, "non2xx": %d, '
      .. '"replayed": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    bad, replays, e.connect, e.read, e.write, e.timeout
  ))
end
