//! A restricted unpickler for the `data.pkl` of PyTorch zip checkpoints.
//!
//! It is a small stack machine over the opcodes `torch.save` emits (protocol 2 by default; the
//! opcodes of protocols 3–5 that matter are understood too). It never executes anything:
//! `GLOBAL`/`STACK_GLOBAL` only resolve names on a fixed allow-list to [`Global`] markers, and any
//! other name fails at once with [`ExportError::UnsafePickle`]. Calling a marker (`REDUCE`,
//! `NEWOBJ`) is emulated: `_rebuild_tensor_v2` records a [`TensorRef`] (a view into a storage,
//! checked against the storage's size by the caller), `OrderedDict()` makes an empty dict, and so
//! on.
//!
//! Containers live in an arena ([`Unpickled::objects`]) and values refer to them by index, so a
//! memoized dict that is filled after `BINPUT` is the same dict when fetched by `BINGET`, cycles
//! are harmless, and nothing is dropped recursively. Strings are reference-counted, so the memory
//! used is proportional to the pickle's length whatever it asks for.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use crate::error::{ExportError, Result};
use crate::tensor::DType;

const FORMAT: &str = "pytorch zip";

/// Most values the stack may hold at once.
const MAX_STACK: usize = 1 << 20;
/// Most memo entries.
const MAX_MEMO: usize = 1 << 24;
/// Most dimensions a tensor may have.
const MAX_DIMS: usize = 32;

/// A callable or class the allow-list admits. Only these can be named by a pickle we load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    /// `collections.OrderedDict`
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2` and `torch._utils._rebuild_tensor`
    RebuildTensor,
    /// `torch._utils._rebuild_parameter` and `torch._utils._rebuild_parameter_with_state`
    RebuildParameter,
    /// A typed storage class, e.g. `torch.FloatStorage`.
    Storage(DType),
    /// A dtype object, e.g. `torch.float16`.
    Dtype(DType),
    /// `torch.Size`
    Size,
    /// `_codecs.encode` (how protocol 2 pickles `bytes`)
    CodecsEncode,
    /// `numpy.dtype` and `numpy.core.multiarray.scalar` (`numpy._core.multiarray` in numpy 2):
    /// how a numpy scalar outside the weights (a training script's `global_step = np.int64(…)`)
    /// is pickled. Calling either makes an inert [`Value::Numpy`]; nothing of numpy runs.
    NumpyDtype,
    NumpyScalar,
}

impl Global {
    /// Resolve `module.name`; `None` for anything outside the allow-list.
    fn resolve(module: &str, name: &str) -> Option<Global> {
        let global = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                Global::RebuildParameter
            }
            ("torch", "Size") => Global::Size,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("numpy", "dtype") => Global::NumpyDtype,
            ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Global::NumpyScalar,
            ("torch", name) => {
                if let Some(dtype) = storage_dtype(name) {
                    Global::Storage(dtype)
                } else {
                    Global::Dtype(dtype_by_name(name)?)
                }
            }
            _ => return None,
        };
        Some(global)
    }
}

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

fn dtype_by_name(name: &str) -> Option<DType> {
    Some(match name {
        "float32" => DType::F32,
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        "float64" => DType::F64,
        "int64" => DType::I64,
        "int32" => DType::I32,
        "int16" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        _ => return None,
    })
}

/// One value on the stack or in the memo. Containers are indices into [`Unpickled::objects`],
/// storages and tensors indices into [`Unpickled::storages`] and [`Unpickled::tensors`].
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in an `i64` (its value is never needed).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Global(Global),
    Storage(usize),
    Tensor(usize),
    Obj(usize),
    /// A numpy dtype or scalar (its value is never needed).
    Numpy,
}

/// A container built by the pickle.
#[derive(Debug)]
pub(crate) enum Object {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Items in insertion order; a repeated key appears twice (the later one wins, as in Python).
    Dict(Vec<(Value, Value)>),
}

/// A storage named by a persistent id `('storage', storage_type, key, location, numel)`.
#[derive(Debug)]
pub(crate) struct StorageRef {
    /// The archive entry holding the bytes is `<prefix>/data/<key>`.
    pub key: String,
    pub dtype: DType,
    /// Elements the pickle says the storage holds (the archive entry is checked separately).
    pub numel: usize,
}

/// A tensor rebuilt by `_rebuild_tensor_v2`: a strided view into a storage, in elements.
/// Nothing about its bounds is checked here beyond the arithmetic not overflowing.
#[derive(Debug)]
pub(crate) struct TensorRef {
    /// Index into [`Unpickled::storages`].
    pub storage: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The result of unpickling: the top-level value and everything it refers to.
#[derive(Debug)]
pub(crate) struct Unpickled {
    pub root: Value,
    pub objects: Vec<Object>,
    pub storages: Vec<StorageRef>,
    pub tensors: Vec<TensorRef>,
}

impl Unpickled {
    /// The items of `value` if it is a dict.
    pub fn as_dict(&self, value: &Value) -> Option<&[(Value, Value)]> {
        match value {
            Value::Obj(id) => match self.objects.get(*id) {
                Some(Object::Dict(items)) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// A short description of `value` for error messages ("a list", "the int 3", ...).
    pub fn describe(&self, value: &Value) -> String {
        match value {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::BigInt => "a large int".into(),
            Value::Float(x) => format!("the float {x}"),
            Value::Str(s) => format!("the string {:?}", truncate(s, 40)),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Global(g) => format!("the global {g:?}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Numpy => "a numpy scalar or dtype".into(),
            Value::Obj(id) => match self.objects.get(*id) {
                Some(Object::Tuple(v)) => format!("a tuple of {}", v.len()),
                Some(Object::List(v)) => format!("a list of {}", v.len()),
                Some(Object::Dict(v)) => format!("a dict of {}", v.len()),
                None => "an unknown object".into(),
            },
        }
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Unpickle `data` (the bytes of `data.pkl` inside the checkpoint at `path`, which errors name).
pub(crate) fn unpickle(path: &Path, data: &[u8]) -> Result<Unpickled> {
    let mut machine = Machine {
        path,
        data,
        pos: 0,
        op_at: 0,
        op: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        out: Unpickled {
            root: Value::None,
            objects: Vec::new(),
            storages: Vec::new(),
            tensors: Vec::new(),
        },
    };
    machine.out.root = machine.run()?;
    Ok(machine.out)
}

mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_LIST: u8 = b']';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const LIST: u8 = b'l';
    pub const DICT: u8 = b'd';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINFLOAT: u8 = b'G';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const NONE: u8 = b'N';
    pub const BINUNICODE: u8 = b'X';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES8: u8 = 0x8e;
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const REDUCE: u8 = b'R';
    pub const BUILD: u8 = b'b';
    pub const NEWOBJ: u8 = 0x81;
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const BINPERSID: u8 = b'Q';
}

/// Where the machine is, for error messages (copied out so that errors can be built while the
/// machine is mutably borrowed).
#[derive(Clone, Copy)]
struct At<'a> {
    path: &'a Path,
    op: u8,
    pos: usize,
}

impl At<'_> {
    fn err(self, reason: impl std::fmt::Display) -> ExportError {
        ExportError::malformed(
            self.path,
            FORMAT,
            format!(
                "data.pkl: {reason} (opcode 0x{:02x} at byte {})",
                self.op, self.pos
            ),
        )
    }
}

struct Machine<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    /// Position and value of the opcode being executed, for error messages.
    op_at: usize,
    op: u8,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK; values below the innermost mark cannot be popped.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    out: Unpickled,
}

impl<'a> Machine<'a> {
    fn run(&mut self) -> Result<Value> {
        loop {
            self.op_at = self.pos;
            self.op = self.byte()?;
            match self.op {
                op::PROTO => {
                    let version = self.byte()?;
                    if version > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {version}")));
                    }
                }
                // Frames only group opcodes for buffered reading; the opcodes follow inline.
                op::FRAME => {
                    self.take(8)?;
                }
                op::STOP => return self.pop(),
                op::MARK => {
                    if self.marks.len() >= MAX_STACK {
                        return Err(self.err("too many nested MARKs"));
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    self.pop()?;
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let top = self.peek()?.clone();
                    self.push(top)?;
                }
                op::EMPTY_DICT => self.push_object(Object::Dict(Vec::new()))?,
                op::EMPTY_LIST => self.push_object(Object::List(Vec::new()))?,
                op::EMPTY_TUPLE => self.push_object(Object::Tuple(Vec::new()))?,
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push_object(Object::Tuple(items))?;
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(self.op - op::TUPLE1) + 1;
                    let items = self.pop_n(n)?;
                    self.push_object(Object::Tuple(items))?;
                }
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push_object(Object::List(items))?;
                }
                op::DICT => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_object(Object::Dict(pairs))?;
                }
                op::BINPUT => {
                    let key = self.byte()?;
                    self.memo_put(u32::from(key))?;
                }
                op::LONG_BINPUT => {
                    let key = self.u32()?;
                    self.memo_put(key)?;
                }
                op::MEMOIZE => {
                    let key =
                        u32::try_from(self.memo.len()).map_err(|_| self.err("memo is full"))?;
                    self.memo_put(key)?;
                }
                op::BINGET => {
                    let key = self.byte()?;
                    self.memo_get(u32::from(key))?;
                }
                op::LONG_BINGET => {
                    let key = self.u32()?;
                    self.memo_get(key)?;
                }
                op::BININT => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::BININT1 => {
                    let v = self.byte()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::LONG1 => {
                    let n = usize::from(self.byte()?);
                    let bytes = self.take(n)?;
                    self.push(long_value(bytes))?;
                }
                op::LONG4 => {
                    let n = self.len_u32()?;
                    let bytes = self.take(n)?;
                    self.push(long_value(bytes))?;
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v))?;
                }
                op::NEWTRUE => self.push(Value::Bool(true))?,
                op::NEWFALSE => self.push(Value::Bool(false))?,
                op::NONE => self.push(Value::None)?,
                op::SHORT_BINUNICODE => {
                    let n = usize::from(self.byte()?);
                    self.push_str(n)?;
                }
                op::BINUNICODE => {
                    let n = self.len_u32()?;
                    self.push_str(n)?;
                }
                op::BINUNICODE8 => {
                    let n = self.len_u64()?;
                    self.push_str(n)?;
                }
                op::SHORT_BINBYTES => {
                    let n = usize::from(self.byte()?);
                    self.push_bytes(n)?;
                }
                op::BINBYTES => {
                    let n = self.len_u32()?;
                    self.push_bytes(n)?;
                }
                op::BINBYTES8 => {
                    let n = self.len_u64()?;
                    self.push_bytes(n)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = self.resolve(module, name)?;
                    self.push(Value::Global(global))?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let global = self.resolve(module, name)?;
                    self.push(Value::Global(global))?;
                }
                op::REDUCE | op::NEWOBJ => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let result = self.call(&callable, &args)?;
                    self.push(result)?;
                }
                // BUILD sets attributes on the object below it (e.g. `_metadata` on a
                // state_dict); none matter to us, so the state is dropped, never applied.
                op::BUILD => {
                    self.pop()?;
                    self.peek()?;
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.dict_mut()?.push((key, value));
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.dict_mut()?.extend(pairs);
                }
                op::APPEND => {
                    let value = self.pop()?;
                    self.list_mut()?.push(value);
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.list_mut()?.extend(items);
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(&pid)?;
                    self.push(storage)?;
                }
                other => {
                    return Err(self.err(format!("unsupported or unknown opcode 0x{other:02x}")))
                }
            }
        }
    }

    // ---- errors -------------------------------------------------------------------------------

    fn at(&self) -> At<'a> {
        At {
            path: self.path,
            op: self.op,
            pos: self.op_at,
        }
    }

    fn err(&self, reason: impl std::fmt::Display) -> ExportError {
        self.at().err(reason)
    }

    // ---- reading the input --------------------------------------------------------------------

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let end = self.pos.checked_add(n).filter(|&end| end <= data.len());
        match end.and_then(|end| data.get(self.pos..end)) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(self.err(format!(
                "needs {n} more bytes but only {} remain (truncated, or not a pickle)",
                data.len().saturating_sub(self.pos)
            ))),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len_u32(&mut self) -> Result<usize> {
        let n = self.u32()?;
        usize::try_from(n).map_err(|_| self.err("length does not fit in memory"))
    }

    fn len_u64(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.err("length does not fit in memory"))
    }

    /// A newline-terminated ASCII line (the arguments of GLOBAL).
    fn line(&mut self) -> Result<&'a str> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let Some(len) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err("GLOBAL argument is not terminated by a newline"));
        };
        let bytes = self.take(len)?;
        self.take(1)?;
        std::str::from_utf8(bytes).map_err(|_| self.err("GLOBAL argument is not text"))
    }

    // ---- the stack ----------------------------------------------------------------------------

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, value: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("stack deeper than {MAX_STACK} values")));
        }
        self.stack.push(value);
        Ok(())
    }

    fn push_object(&mut self, object: Object) -> Result<()> {
        let id = self.out.objects.len();
        self.out.objects.push(object);
        self.push(Value::Obj(id))
    }

    fn push_str(&mut self, n: usize) -> Result<()> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| self.err("string is not valid UTF-8"))?;
        self.push(Value::Str(Rc::from(s)))
    }

    fn push_bytes(&mut self, n: usize) -> Result<()> {
        let bytes = self.take(n)?;
        self.push(Value::Bytes(Rc::from(bytes)))
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.fence() {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn peek(&self) -> Result<&Value> {
        if self.stack.len() <= self.fence() {
            return Err(self.err("stack underflow"));
        }
        self.stack.last().ok_or_else(|| self.err("stack underflow"))
    }

    /// The top `n` values, in stack order.
    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>> {
        let start = self
            .stack
            .len()
            .checked_sub(n)
            .filter(|&s| s >= self.fence());
        let Some(start) = start else {
            return Err(self.err("stack underflow"));
        };
        Ok(self.stack.split_off(start))
    }

    /// Everything above the innermost MARK, which is closed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err("no MARK to pop to"));
        };
        if mark > self.stack.len() {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let Some(key) = it.next() {
            let Some(value) = it.next() else {
                return Err(self.err("odd number of items for a dict"));
            };
            pairs.push((key, value));
        }
        Ok(pairs)
    }

    /// Arena index of the container on top of the stack.
    fn top_object_id(&self) -> Result<usize> {
        match self.peek()? {
            Value::Obj(id) => Ok(*id),
            other => Err(self.err(format!(
                "expected a dict or list on the stack, found {}",
                self.out.describe(other)
            ))),
        }
    }

    fn dict_mut(&mut self) -> Result<&mut Vec<(Value, Value)>> {
        let id = self.top_object_id()?;
        let at = self.at();
        match self.out.objects.get_mut(id) {
            Some(Object::Dict(items)) => Ok(items),
            _ => Err(at.err("SETITEM(S) target is not a dict")),
        }
    }

    fn list_mut(&mut self) -> Result<&mut Vec<Value>> {
        let id = self.top_object_id()?;
        let at = self.at();
        match self.out.objects.get_mut(id) {
            Some(Object::List(items)) => Ok(items),
            _ => Err(at.err("APPEND(S) target is not a list")),
        }
    }

    // ---- the memo -----------------------------------------------------------------------------

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let value = self.peek()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(self.err(format!("more than {MAX_MEMO} memo entries")));
        }
        self.memo.insert(key, value);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        match self.memo.get(&key) {
            Some(value) => {
                let value = value.clone();
                self.push(value)
            }
            None => Err(self.err(format!("memo entry {key} is not defined"))),
        }
    }

    // ---- globals and calls --------------------------------------------------------------------

    fn resolve(&self, module: &str, name: &str) -> Result<Global> {
        Global::resolve(module, name).ok_or_else(|| ExportError::UnsafePickle {
            path: self.path.to_path_buf(),
            global: format!("{module}.{name}"),
        })
    }

    fn tuple_items(&self, value: &Value) -> Option<&[Value]> {
        match value {
            Value::Obj(id) => match self.out.objects.get(*id) {
                Some(Object::Tuple(items)) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// Emulate calling an allow-listed global with the tuple `args`.
    fn call(&mut self, callable: &Value, args: &Value) -> Result<Value> {
        let Value::Global(global) = callable else {
            let what = self.out.describe(callable);
            return Err(self.err(format!("cannot call {what}")));
        };
        let Some(args) = self.tuple_items(args) else {
            let what = self.out.describe(args);
            return Err(self.err(format!("arguments of {global:?} are {what}, not a tuple")));
        };
        match global {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(self.err("OrderedDict called with arguments"));
                }
                let id = self.out.objects.len();
                self.out.objects.push(Object::Dict(Vec::new()));
                Ok(Value::Obj(id))
            }
            Global::RebuildTensor => {
                let args = args.to_vec();
                self.rebuild_tensor(&args)
            }
            Global::RebuildParameter => match args.first() {
                Some(tensor @ Value::Tensor(_)) => Ok(tensor.clone()),
                _ => Err(self.err("_rebuild_parameter expects a tensor as its first argument")),
            },
            Global::Size => match args {
                [] => {
                    let id = self.out.objects.len();
                    self.out.objects.push(Object::Tuple(Vec::new()));
                    Ok(Value::Obj(id))
                }
                [dims] if self.tuple_items(dims).is_some() => Ok(dims.clone()),
                _ => Err(self.err("torch.Size expects one tuple")),
            },
            Global::CodecsEncode => codecs_encode(args).map_err(|reason| self.err(reason)),
            Global::NumpyDtype | Global::NumpyScalar => Ok(Value::Numpy),
            Global::Storage(_) | Global::Dtype(_) => {
                Err(self.err(format!("{global:?} cannot be called")))
            }
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
    /// backward_hooks[, metadata])` and `_rebuild_tensor(storage, storage_offset, size, stride)`.
    fn rebuild_tensor(&mut self, args: &[Value]) -> Result<Value> {
        let [storage, offset, size, stride, ..] = args else {
            return Err(self.err("_rebuild_tensor expects at least 4 arguments"));
        };
        let Value::Storage(storage) = *storage else {
            let what = self.out.describe(storage);
            return Err(self.err(format!("tensor storage is {what}")));
        };
        let offset = self.non_negative(offset, "storage offset")?;
        let shape = self.dims(size, "size")?;
        let stride = self.dims(stride, "stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!(
                "tensor size has {} dimensions but its stride {}",
                shape.len(),
                stride.len()
            )));
        }
        let id = self.out.tensors.len();
        self.out.tensors.push(TensorRef {
            storage,
            offset,
            shape,
            stride,
        });
        Ok(Value::Tensor(id))
    }

    fn non_negative(&self, value: &Value, what: &str) -> Result<usize> {
        match value {
            Value::Int(i) => usize::try_from(*i)
                .map_err(|_| self.err(format!("{what} {i} is negative or too large"))),
            other => {
                let found = self.out.describe(other);
                Err(self.err(format!("{what} should be an int, found {found}")))
            }
        }
    }

    fn dims(&self, value: &Value, what: &str) -> Result<Vec<usize>> {
        let Some(items) = self.tuple_items(value) else {
            let found = self.out.describe(value);
            return Err(self.err(format!("tensor {what} should be a tuple, found {found}")));
        };
        if items.len() > MAX_DIMS {
            return Err(self.err(format!("tensor has more than {MAX_DIMS} dimensions")));
        }
        items.iter().map(|v| self.non_negative(v, what)).collect()
    }

    /// `persistent_load` for `('storage', storage_type, key, location, numel)`.
    fn persistent_load(&mut self, pid: &Value) -> Result<Value> {
        let items = self.tuple_items(pid).unwrap_or_default();
        let [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _location, numel] =
            items
        else {
            let what = self.out.describe(pid);
            return Err(self.err(format!(
                "persistent id is {what}, expected ('storage', storage type, key, location, numel)"
            )));
        };
        if &**tag != "storage" {
            return Err(self.err(format!("unknown persistent id kind {tag:?}")));
        }
        let (dtype, key) = (*dtype, key.to_string());
        let numel = self.non_negative(numel, "storage size")?;
        let id = self.out.storages.len();
        self.out.storages.push(StorageRef { key, dtype, numel });
        Ok(Value::Storage(id))
    }
}

/// The value of a little-endian two's-complement integer (LONG1 / LONG4).
fn long_value(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::BigInt;
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut buf = if negative { [0xff; 8] } else { [0; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

/// `_codecs.encode(text, 'latin1')`, which is how protocol 2 pickles `bytes`.
fn codecs_encode(args: &[Value]) -> std::result::Result<Value, String> {
    let (text, encoding) = match args {
        [Value::Str(text)] => (text, "utf-8"),
        [Value::Str(text), Value::Str(encoding)] => (text, &**encoding),
        _ => return Err("_codecs.encode expects (str, encoding)".into()),
    };
    let bytes: Vec<u8> = match encoding.to_ascii_lowercase().replace('_', "-").as_str() {
        "latin1" | "latin-1" | "iso-8859-1" | "l1" => text
            .chars()
            .map(|c| u8::try_from(u32::from(c)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| "_codecs.encode: text is not latin-1".to_string())?,
        "utf-8" | "utf8" => text.as_bytes().to_vec(),
        other => return Err(format!("_codecs.encode: unsupported encoding {other:?}")),
    };
    Ok(Value::Bytes(Rc::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(data: &[u8]) -> Result<Unpickled> {
        unpickle(Path::new("test.pt"), data)
    }

    fn malformed_reason(result: Result<Unpickled>) -> String {
        match result {
            Err(ExportError::Malformed { reason, path, .. }) => {
                assert_eq!(path, Path::new("test.pt"));
                reason
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn unsafe_global(result: Result<Unpickled>) -> String {
        match result {
            Err(ExportError::UnsafePickle { global, path }) => {
                assert_eq!(path, Path::new("test.pt"));
                global
            }
            other => panic!("expected UnsafePickle, got {other:?}"),
        }
    }

    /// A dict beside the weights holding a numpy scalar, as `pickle.dumps({'global_step':
    /// numpy.int64(7), 'x': 1}, protocol=2)` writes it (numpy 2.4): read, the scalar inert.
    #[test]
    fn numpy_scalars_are_read_as_inert_values() {
        let p = b"\x80\x02}q\x00(X\x0b\x00\x00\x00global_stepq\x01cnumpy._core.multiarray\nscalar\nq\x02cnumpy\ndtype\nq\x03X\x02\x00\x00\x00i8q\x04\x89\x88\x87q\x05Rq\x06(K\x03X\x01\x00\x00\x00<q\x07NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x08bc_codecs\nencode\nq\tX\x08\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00q\nX\x06\x00\x00\x00latin1q\x0b\x86q\x0cRq\r\x86q\x0eRq\x0fX\x01\x00\x00\x00xq\x10K\x01u.";
        let u = load(p).unwrap();
        let d = u.as_dict(&u.root).unwrap();
        assert_eq!(d.len(), 2);
        assert!(matches!(&d[0], (Value::Str(k), Value::Numpy) if &**k == "global_step"));
        assert!(matches!(&d[1], (Value::Str(k), Value::Int(1)) if &**k == "x"));
        // numpy 1's module name too; other numpy names stay refused
        let p1 = replace(p, b"numpy._core", b"numpy.core");
        let u = load(&p1).unwrap();
        assert!(matches!(&u.as_dict(&u.root).unwrap()[0].1, Value::Numpy));
        let p2 = replace(p, b"scalar", b"_reconstruct");
        assert_eq!(
            unsafe_global(load(&p2)),
            "numpy._core.multiarray._reconstruct"
        );
    }

    /// `data` with its one occurrence of `from` replaced by `to`.
    fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let i = data.windows(from.len()).position(|w| w == from).unwrap();
        [&data[..i], to, &data[i + from.len()..]].concat()
    }

    #[test]
    fn stack_global_outside_allow_list_is_refused() {
        // PROTO 4, 'builtins' 'eval' STACK_GLOBAL, 'print(1)' TUPLE1 REDUCE STOP
        let mut p = vec![0x80, 4, 0x8c, 8];
        p.extend_from_slice(b"builtins");
        p.extend_from_slice(&[0x8c, 4]);
        p.extend_from_slice(b"eval");
        p.push(0x93);
        p.extend_from_slice(&[0x8c, 8]);
        p.extend_from_slice(b"print(1)");
        p.extend_from_slice(&[0x85, b'R', b'.']);
        assert_eq!(unsafe_global(load(&p)), "builtins.eval");
    }

    #[test]
    fn global_outside_allow_list_is_refused_before_any_call() {
        // The REDUCE that would run it is never reached; an unknown opcode after GLOBAL proves it.
        assert_eq!(
            unsafe_global(load(b"\x80\x02csubprocess\nPopen\n\xff")),
            "subprocess.Popen"
        );
        assert_eq!(
            unsafe_global(load(b"\x80\x02ctorch\nload\n.")),
            "torch.load"
        );
    }

    #[test]
    fn unknown_opcode_names_byte_and_position() {
        let reason = malformed_reason(load(b"\x80\x02}\xfe."));
        assert!(reason.contains("0xfe"), "{reason}");
        assert!(reason.contains("at byte 3"), "{reason}");
    }

    #[test]
    fn truncated_input_is_malformed() {
        let reason = malformed_reason(load(b"\x80\x02X\x10\x00\x00\x00abc"));
        assert!(reason.contains("truncated"), "{reason}");
        // No STOP at all.
        malformed_reason(load(b"\x80\x02}"));
        // A length that cannot be satisfied must not be allocated.
        malformed_reason(load(b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\x7f"));
    }

    #[test]
    fn marks_fence_the_stack() {
        // `}` MARK TUPLE1: TUPLE1 may not reach below the mark.
        let reason = malformed_reason(load(b"\x80\x02}(\x85."));
        assert!(reason.contains("underflow"), "{reason}");
        malformed_reason(load(b"\x80\x02h\x05."));
        malformed_reason(load(b"\x80\x02t."));
    }

    #[test]
    fn memo_shares_containers_filled_after_put() {
        // d = {}; memo[0] = d; l = [memo[0]]; memo[0]['a'] = 1; root = (d, l).
        // With copy-on-get semantics `d` would stay empty.
        let data = b"\x80\x02}q\x00]q\x01h\x00ah\x00X\x01\x00\x00\x00aK\x01s0\x86.";
        let u = load(data).unwrap();
        let Some(Object::Tuple(items)) = u.root_obj() else {
            panic!("root is not a tuple: {:?}", u.root)
        };
        let d = u.as_dict(&items[0]).unwrap();
        assert_eq!(d.len(), 1);
        let Value::Obj(l) = items[1] else { panic!() };
        let Some(Object::List(l)) = u.objects.get(l) else {
            panic!()
        };
        assert_eq!(u.as_dict(&l[0]).map(<[_]>::len), Some(1));
    }

    #[test]
    fn integers_decode() {
        let u = load(b"\x80\x02(J\xfe\xff\xff\xff\x8a\x01\xff\x8a\x02\x00\x80\x8a\x00M\xff\xff\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01t.").unwrap();
        let Some(Object::Tuple(items)) = u.root_obj() else {
            panic!()
        };
        let ints: Vec<Option<i64>> = items
            .iter()
            .map(|v| match v {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .collect();
        assert_eq!(
            ints,
            vec![Some(-2), Some(-1), Some(-32768), Some(0), Some(65535), None]
        );
    }

    #[test]
    fn codecs_encode_is_emulated() {
        let u = load(
            b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xbfX\x06\x00\x00\x00latin1\x86R.",
        )
        .unwrap();
        let Value::Bytes(b) = &u.root else {
            panic!("{:?}", u.root)
        };
        assert_eq!(&**b, &[0xff]);
        // U+0100 is not latin-1.
        malformed_reason(load(
            b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00\xc4\x80X\x06\x00\x00\x00latin1\x86R.",
        ));
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        // l = []; repeat: l = [l]  (MARK GET 0 LIST PUT 0 POP), 200k levels, then GET 0 STOP.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..200_000 {
            p.extend_from_slice(b"(h\x00lq\x000");
        }
        p.extend_from_slice(b"0h\x00.");
        let u = load(&p).unwrap();
        assert_eq!(u.objects.len(), 200_001);
    }

    #[test]
    fn bad_rebuild_arguments_are_malformed() {
        // _rebuild_tensor_v2 called with a non-storage.
        let reason = malformed_reason(load(
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)))tR.",
        ));
        assert!(reason.contains("storage"), "{reason}");
        // Persistent id of the wrong shape.
        malformed_reason(load(b"\x80\x02X\x01\x00\x00\x00xQ."));
    }

    impl Unpickled {
        fn root_obj(&self) -> Option<&Object> {
            match self.root {
                Value::Obj(id) => self.objects.get(id),
                _ => None,
            }
        }
    }
}
