import { parseWrk } from '../../bench/datapath.js';
import { parseFlags } from '../../bench/run.js';

describe('bench harness parsing', () => {
  test('flags: --a 1 --b --c=x', () => {
    expect(parseFlags(['--pods', '1000', '--verbose', '--mode=ebpf'])).toEqual({ pods: '1000', verbose: true, mode: 'ebpf' });
    expect(() => parseFlags(['pods'])).toThrow(/unexpected argument "pods"/);
  });

  test('wrk --latency report', () => {
    const out = `Running 10s test @ http://10.77.1.3:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   780.51us  500.00us  20.00ms   90.00%
    Req/Sec    64.10k     3.00k   70.00k    80.00%
  Latency Distribution
     50%  584.00us
     75%  800.00us
     90%    1.20ms
     99%    9.36ms
  192638 requests in 3.00s, 14.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  64167.12
Transfer/sec:      4.67MB
`;
    expect(parseWrk(out)).toEqual({ rps: 64167, p50_us: 584, p99_us: 9360, requests: 192638, errors: 3 });
    expect(() => parseWrk('garbage')).toThrow(/cannot parse wrk output/);
  });
});
