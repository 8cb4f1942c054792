# Time and WAN bytes to the target from the agents' reports, as `weightgrad bench --real`
# reads them (real::curve): the first evaluation at which every region is at the target,
# seconds from the earliest region's start. Usage: python3 summarize.py agents 0.82
import json,sys,os
base=sys.argv[1]; target=float(sys.argv[2])
for seed in sorted(os.listdir(base)):
    if not seed.startswith('seed'): continue
    for p in ["weightgrad", "topk", "full-sync"]:
        d=os.path.join(base,seed,p)
        if not os.path.isdir(d): continue
        reps=[json.load(open(os.path.join(d,f))) for f in sorted(os.listdir(d)) if f.endswith('.json')]
        if len(reps)<3: print(seed,p,'incomplete',len(reps)); continue
        start=min(r['training_started_unix'] for r in reps)
        t=b=None
        for e in reps[0]['evaluations']:
            at=[next((x for x in r['evaluations'] if x['round']==e['round']),None) for r in reps]
            if None in at: continue
            if min(x['test_accuracy'] for x in at)>=target:
                t=max(x['unix_seconds'] for x in at)-start; b=sum(x['wan_bytes'] for x in at); rnd=e['round']; break
        acc=min(r['test_accuracy'] for r in reps)
        wall=max(r['wall_seconds'] for r in reps); wb=sum(r['wan_bytes'] for r in reps)
        print(seed,p,'t_target %.2f'%t if t else None,'round',rnd if t else None,'bytes_target',b,'final %.2f'%(acc*100),'wall %.1f'%wall,'bytes',wb)
