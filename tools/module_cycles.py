#!/usr/bin/env python3
"""Import circles between codespot's modules: reads src/**/*.rs, takes an edge A → B for every
`crate::B` in a file of top-level module A (and, inside one top-level module, for
`crate::A::b` / `super::b` between its submodules), and prints the 2-cycles and the strongly
connected components. Both lists are empty when the modules form a DAG.

Usage: python3 tools/module_cycles.py   (from the repository root)
"""
import re, os, sys, itertools
root='src'
mods={}
for dp,_,fs in os.walk(root):
    for f in fs:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f); rel=os.path.relpath(p,root)
        parts=rel[:-3].split('/')
        if parts[-1]=='mod': parts=parts[:-1]
        name='::'.join(parts)
        mods[name]=open(p).read()
def top(n): return n.split('::')[0]
edges=set()
for name,src in mods.items():
    for m in re.finditer(r'crate::([a-z_]+)(?:::([a-z_]+))?', src):
        a,b=m.group(1),m.group(2)
        t=a
        if top(name)!=a: edges.add((top(name),a))
        elif b and (a+'::'+b) in mods and name!=a+'::'+b and not name.startswith(a+'::'+b):
            edges.add((name,a+'::'+b))
    # super:: refs within a parent
    for m in re.finditer(r'super::([a-z_]+)', src):
        parent='::'.join(name.split('::')[:-1])
        tgt=(parent+'::'+m.group(1)) if parent else m.group(1)
        if tgt in mods and tgt!=name: edges.add((name,tgt))
import collections
g=collections.defaultdict(set)
for a,b in edges: g[a].add(b)
# find cycles (2- and 3-cycles) among nodes
cyc=set()
for a in list(g):
    for b in g[a]:
        if a in g.get(b,()): cyc.add(tuple(sorted((a,b))))
print("2-cycles:",sorted(cyc))
# SCCs
idx={}; low={}; st=[]; on=set(); res=[]; c=[0]
def sc(v):
    idx[v]=low[v]=c[0]; c[0]+=1; st.append(v); on.add(v)
    for w in g.get(v,()):
        if w not in idx: sc(w); low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop(); on.discard(w); comp.append(w)
            if w==v: break
        if len(comp)>1: res.append(comp)
sys.setrecursionlimit(10000)
for v in list(g): 
    if v not in idx: sc(v)
print("SCCs:",res)
